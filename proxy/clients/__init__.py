"""Clients of the payment API: who is calling (API keys), what it may do, how often.

`keys` finds the client an `Authorization: Bearer` key belongs to, `gate` admits a request
(401 unauthorized, 429 rate_limited) and says which client it is.

May import: `proxy.store`, `proxy.settings`, `proxy.observability`, `proxy.errors`. Never the
request path above it or `proxy.devtools` (`make lint` checks it).
"""
