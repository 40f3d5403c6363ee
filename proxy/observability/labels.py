"""Fixed label values that configuration must not take as names (it imports nothing)."""

# The `client` label: a name from `clients:`, `open` with `auth: off`, `unknown` before (or
# without) a valid key. Never taken from the request.
OPEN_CLIENT = "open"
UNKNOWN_CLIENT = "unknown"
