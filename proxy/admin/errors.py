"""The admin API's answers other than success, on the gateway's error base (JSON bodies)."""

from __future__ import annotations

from typing import Any

from proxy.errors import PaymentError


class AdminError(PaymentError):
    """An admin request not carried out; nothing was changed. Its outcome is never counted:
    the admin port's answers are not payment requests (payagg_requests_total)."""


class AdminDisabled(AdminError):
    """No admin token is configured: the admin API is off."""

    status = 503
    code = "admin_disabled"

    def __init__(self, variable: str) -> None:
        super().__init__(f"the admin API is off: {variable} is not set on this process")


class AdminUnauthorized(AdminError):
    """No or another token than the configured one."""

    status = 401
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("an admin token is required: Authorization: Bearer <token>")
        self.headers["WWW-Authenticate"] = 'Bearer realm="payagg-admin"'


class AdminBadRequest(AdminError):
    """A missing or invalid field or header; `fields` maps each to its problem."""

    status = 400
    code = "invalid_request"

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("the admin request is invalid", fields=fields)


class AdminNotFound(AdminError):
    status = 404
    code = "not_found"


class AdminStoreUnavailable(AdminError):
    """Redis did not take the change: it would not reach the other processes and tasks."""

    status = 503
    code = "store_unavailable"

    def __init__(self, why: str) -> None:
        super().__init__(f"nothing was changed: {why}")
        self.headers["Retry-After"] = "1"


class ConfigInvalid(AdminError):
    """The file has errors; `problems` lists each as `file:line: key: problem`."""

    status = 422
    code = "config_invalid"

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            f"the config file has {len(problems)} problem(s); the running config is unchanged",
            problems=problems,
        )


class ReloadRefused(AdminError):
    """The file removes or re-targets providers that still have payments not final."""

    status = 409
    code = "reload_refused"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, **details)
