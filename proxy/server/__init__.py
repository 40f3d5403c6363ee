"""The process: listening and serving, workers, client connections, routes and errors as JSON.

`serving` runs one process's life; `workers` and `children` start and stop `--workers N`;
`connections` reads client connections; `app` holds the routes and the one handler that turns
every `PaymentError` into its JSON answer and logs the request; `openapi` serves the API document.

May import: `proxy.payments`, `proxy.providers`, `proxy.store`, `proxy.settings`,
`proxy.observability`, `proxy.errors`. Never `proxy.devtools` (`make lint` checks both).
"""
