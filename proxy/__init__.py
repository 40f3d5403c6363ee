"""payagg: a resilient payment gateway aggregator.

`cli` is the `payagg` command; `errors` the exception per row of the status table, imported by
every layer. The layers, each importing only those below it (pyproject's `[tool.importlinter]`,
checked by `make lint`): `devtools` (the local stack, the demo), `server` (the process),
`payments` (the request path, the lifecycle), `providers` (calling a provider), `store` (Redis),
`settings` (the config), `observability` (metrics, logs).
"""
