"""The configuration: YAML with file:line errors, compiled once into frozen, typed settings.

`yaml_source` reads YAML keeping every value's line, `config` checks and compiles it (every
problem at once), `redis_address` checks `redis.url` and its TLS files.

May import: `proxy.observability`, `proxy.errors`, and the provider descriptions `config`
compiles (`proxy.providers.mapping`, `access_tokens`, `callbacks`). Never `proxy.devtools`
(`make lint` checks it).
"""
