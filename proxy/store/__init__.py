"""Redis: the client, the key layout, the Lua scripts and the records they keep.

`client` talks to Redis through valkey-glide and sorts its failures, `keys` lays out the shards,
`payments` and `outbox` are the lifecycle's scripts, `records` the stored result format, `tokens`
the request ids and lock tokens.

May import: `proxy.settings`, `proxy.observability`, `proxy.errors`. Never the request path
above it or `proxy.devtools` (`make lint` checks it).
"""
