"""The request path and the payment lifecycle: the pay flow's waiting, the reconciler, provider
callbacks in, merchant webhooks out."""
