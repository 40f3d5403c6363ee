"""The payment lifecycle: the pay flow's waiting, the reconciler, provider callbacks in."""
