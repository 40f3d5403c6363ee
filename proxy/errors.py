"""The gateway's error hierarchy: one class per row of the contract's status table.

What a provider error means for the breaker and for a retry is `proxy.providers.classification`'s
to say, not these classes'.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

# The `outcome` label of payagg_requests_total (CONTRACT §4): the metrics create one series per
# value, so an error class can only name one of these (mypy, and the check below at import).
RequestOutcome = Literal[
    "success",
    "declined",
    "pending",
    "provider_error",
    "breaker_open",
    "replayed",
    "in_progress",
    "key_reused",
    "invalid",
    "store_unavailable",
    "overloaded",
    "internal_error",
    "request_timeout",
    "malformed",
    "client_closed",
    "unauthorized",
    "forbidden",
    "rate_limited",
]
REQUEST_OUTCOMES: tuple[RequestOutcome, ...] = get_args(RequestOutcome)


class PaymentError(Exception):
    """An answer other than SUCCESS/DECLINED; its class fixes the HTTP status, code and outcome."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    outcome: ClassVar[RequestOutcome] = "internal_error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.outcome not in REQUEST_OUTCOMES:
            raise TypeError(f"{cls.__name__}.outcome {cls.outcome!r} is no metrics outcome")

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}


class InvalidRequest(PaymentError):
    """Malformed JSON or a missing/invalid field; `fields` maps each bad field to its reason."""

    status = 400
    code = "invalid_request"
    outcome = "invalid"

    def __init__(self, fields: dict[str, str], message: str = "the request is invalid") -> None:
        super().__init__(message, fields=fields)


class UnknownProvider(InvalidRequest):
    """`ProviderKey` names no configured provider (the request is otherwise valid)."""

    code = "unknown_provider"

    def __init__(self, fields: dict[str, str], provider_key: str) -> None:
        super().__init__(fields, f"unknown provider {provider_key!r}")
        self.provider_key = provider_key


class NotFound(PaymentError):
    """No such route or no such payment."""

    status = 404
    code = "not_found"
    outcome = "invalid"


class MethodNotAllowed(PaymentError):
    """The route exists but not for this HTTP method."""

    status = 405
    code = "method_not_allowed"
    outcome = "invalid"


class PayloadTooLarge(PaymentError):
    """The body is larger than `server.max_body_bytes`."""

    status = 413
    code = "payload_too_large"
    outcome = "invalid"


class UnsupportedMediaType(PaymentError):
    """The body is not declared as JSON."""

    status = 415
    code = "unsupported_media_type"
    outcome = "invalid"


class RequestInProgress(PaymentError):
    """Another request with the same idempotency key is being processed right now."""

    status = 409
    code = "request_in_progress"
    outcome = "in_progress"

    def __init__(self) -> None:
        super().__init__("a request with this TransactionID is being processed; retry shortly")
        self.headers["Retry-After"] = "1"


class KeyReused(PaymentError):
    """The idempotency key was used before with a different request body."""

    status = 422
    code = "idempotency_key_reused"
    outcome = "key_reused"

    def __init__(
        self, message: str = "this TransactionID was already used with a different request"
    ) -> None:
        super().__init__(message)


class ProviderMismatch(KeyReused):
    """The provider answered about a payment under this reference with another amount or
    currency: an earlier request with this key, whose record payagg lost (Redis restarted,
    `result_ttl_s` passed). The answer is not this request's; nothing is stored."""

    def __init__(self) -> None:
        PaymentError.__init__(
            self,
            "the provider already holds a payment under this key with a different amount or "
            "currency",
        )


class ProviderFailed(PaymentError):
    """The provider answered 5xx, reset the connection, or sent an unreadable answer."""

    status = 502
    code = "provider_error"
    outcome = "provider_error"

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(message, status="PROVIDER_ERROR", provider=provider)


class ProviderRejected(ProviderFailed):
    """The provider refused our request as malformed (a 4xx that no rule calls a decline).

    It usually means the provider's mapping in the YAML is wrong.
    """


class ProviderBusy(ProviderRejected):
    """The provider answered 408 or 429 and its `breaker.failure_statuses` does not count it."""


class ProviderTimeout(PaymentError):
    """The provider did not answer within its `timeout_s`.

    Never answered since the payment lifecycle: an unknown outcome becomes PENDING (202).
    """

    status = 504
    code = "provider_timeout"
    outcome = "provider_error"

    def __init__(self, provider: str, timeout_s: float) -> None:
        super().__init__(
            f"{provider} did not answer within {timeout_s:g}s",
            status="TIMEOUT",
            provider=provider,
        )


class ProviderUnavailable(PaymentError):
    """The provider's circuit breaker is open, or half-open with its trial calls taken."""

    status = 503
    code = "provider_unavailable"
    outcome = "breaker_open"

    def __init__(self, provider: str, retry_after_s: int) -> None:
        super().__init__(
            f"{provider} is unavailable: its circuit breaker is open (failing, or held by an "
            "operator)",
            provider=provider,
            retry_after_s=retry_after_s,
        )
        self.headers["Retry-After"] = str(retry_after_s)


class StoreUnavailable(PaymentError):
    """Redis does not answer: the gateway fails closed rather than risk a double charge."""

    status = 503
    code = "idempotency_store_unavailable"
    outcome = "store_unavailable"

    def __init__(self) -> None:
        super().__init__("the idempotency store is unreachable; no provider was called")
        self.headers["Retry-After"] = "1"


class ConnectionEnding(PaymentError):
    """An answer after which the connection closes: the rest of its input cannot be trusted."""


class RequestTimeout(ConnectionEnding):
    """Headers and body were not complete within `server.read_timeout_s`."""

    status = 408
    code = "request_timeout"
    outcome = "request_timeout"

    def __init__(self, read_timeout_s: float) -> None:
        super().__init__(f"headers and body were not complete within {read_timeout_s:g}s")


class MalformedRequest(ConnectionEnding):
    """The bytes are not valid HTTP/1.1 (bad framing, a smuggling attempt, invalid header bytes).

    `reason` is the parser's reason and never quotes the request's bytes, which may be a
    payment's details.
    """

    status = 400
    code = "malformed_request"
    outcome = "malformed"

    def __init__(self, reason: str) -> None:
        super().__init__("the request is not valid HTTP/1.1", reason=reason)
        self.reason = reason


class ClientClosed(ConnectionEnding):
    """The client hung up before its request was complete; nobody reads this answer.

    499 is nginx's status for it, seen only in the request log line.
    """

    status = 499
    code = "client_closed"
    outcome = "client_closed"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before its request was complete")


# --- Provider calls: where a failed call stopped decides what a retry may do ------------------


class ProviderNotReached(ProviderFailed):
    """No byte of the request reached the provider (refused, DNS, TLS): a retry is safe."""


class OutcomeUnknown(ProviderTimeout):
    """The request was handed to the provider, in whole or in part, and no usable answer came back.

    The provider may have charged it: only the provider reference, reused by every retry, keeps a
    retry from charging twice. The payment becomes PENDING (202) and is reconciled.
    """

    def __init__(self, provider: str, message: str) -> None:
        PaymentError.__init__(self, message, status="TIMEOUT", provider=provider)


class PaymentAlreadyExists(OutcomeUnknown):
    """The provider already holds a payment under this reference (MTN: 409
    RESOURCE_ALREADY_EXIST), so it may have charged it: the outcome is unknown here, as after a
    timeout, and the payment is reconciled like one, from the provider's status endpoint.
    """

    def __init__(self, provider: str) -> None:
        super().__init__(
            provider,
            f"{provider} already holds a payment under this reference; its outcome is not "
            "known yet: retry later",
        )


class Overloaded(PaymentError):
    """payagg itself is out of a resource (file descriptors, connection pool): never the provider's
    fault, so never counted against its breaker."""

    status = 503
    code = "overloaded"
    outcome = "overloaded"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers["Retry-After"] = "1"


class CallbackUnauthorized(PaymentError):
    """A provider callback whose URL token or the provider's own signature does not check out:
    nothing is changed."""

    status = 401
    code = "unauthorized"
    outcome = "unauthorized"


# --- Clients: who is calling, what it may do, how often (proxy/clients/) ----------------------


class Unauthorized(PaymentError):
    """`auth: required` and the request carries no API key, or one no client has."""

    status = 401
    code = "unauthorized"
    outcome = "unauthorized"

    def __init__(self) -> None:
        super().__init__("an API key is required: Authorization: Bearer <key>")
        self.headers["WWW-Authenticate"] = 'Bearer realm="payagg"'


class Forbidden(PaymentError):
    """The client may not pay with this provider."""

    status = 403
    code = "forbidden"
    outcome = "forbidden"

    def __init__(self, provider: str) -> None:
        super().__init__(f"this client may not use {provider}", provider=provider)


class RateLimited(PaymentError):
    """The client is over its rate limit, shared by every process and task."""

    status = 429
    code = "rate_limited"
    outcome = "rate_limited"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            f"over this client's rate limit; retry in {retry_after_s}s",
            retry_after_s=retry_after_s,
        )
        self.headers["Retry-After"] = str(retry_after_s)
