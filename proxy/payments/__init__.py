"""The request path and the payment lifecycle."""
