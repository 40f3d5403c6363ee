"""The gateway's error hierarchy: one class per row of the contract's status table."""

from __future__ import annotations

from typing import Any, ClassVar


class PaymentError(Exception):
    """An answer other than SUCCESS/DECLINED; its class fixes the HTTP status, code and outcome."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    outcome: ClassVar[str] = "internal_error"
    # Whether the provider's breaker should count this as a sign the provider is down.
    counts_against_breaker: ClassVar[bool] = False

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
    """`ProviderKey` names no configured provider."""

    code = "unknown_provider"


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


class ProviderFailed(PaymentError):
    """The provider answered 5xx, reset the connection, or sent an unreadable answer."""

    status = 502
    code = "provider_error"
    outcome = "provider_error"
    counts_against_breaker = True

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(message, status="PROVIDER_ERROR", provider=provider)


class ProviderRejected(ProviderFailed):
    """The provider refused our request as malformed (a 4xx that no rule calls a decline).

    It proves the provider is up, so it does not count against the breaker; it usually means
    the provider's mapping in the YAML is wrong.
    """

    counts_against_breaker = False


class ProviderTimeout(PaymentError):
    """The provider did not answer within its `timeout_s`."""

    status = 504
    code = "provider_timeout"
    outcome = "timeout"
    counts_against_breaker = True

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
            f"{provider} is failing; its circuit breaker is open",
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
