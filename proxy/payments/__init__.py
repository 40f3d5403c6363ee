"""The request path and the payment lifecycle.

`request` reads and checks a payment, `flow` is `POST /v1/pay` step by step, `idempotency` claims
and replays, `lifecycle` is the state machine, `reconciler` settles what is unknown, `callbacks_in`
takes provider callbacks, `webhooks` tells merchants, `wakeups` wakes a waiting handler.

May import: `proxy.providers`, `proxy.store`, `proxy.settings`, `proxy.observability`,
`proxy.errors`. Never `proxy.server`, `proxy.cli` or `proxy.devtools` (`make lint` checks it).
"""
