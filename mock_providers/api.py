"""What each mock provider module supplies: its routes, request parsing and answer formats."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mock_providers.ledger import Entry, Payment
from mock_providers.tokens import Access, Credentials

JsonBody = dict[str, Any]


@dataclass(frozen=True)
class MockReply:
    """An HTTP status and the JSON body that goes with it (None: an empty body)."""

    status: int
    body: JsonBody | None


class Rejected(Exception):
    """A request refused before any fault is drawn (400, 401, bad credentials), with the
    provider's answer; `unauthorized` when it counts as such in the stats."""

    def __init__(self, answer: MockReply, unauthorized: bool = False) -> None:
        super().__init__(answer.status, answer.body)
        self.answer = answer
        self.unauthorized = unauthorized


@dataclass(frozen=True)
class ProviderApi:
    """One provider's dialect; the shared behaviour (faults, ledger, tokens, callbacks, admin)
    lives in app.py."""

    name: str
    default_port: int
    token_path: str
    payment_path: str
    status_path: str  # an aiohttp route with a `{reference}` part
    token_ttl_s: float  # the real provider's token lifetime
    approval_timeout_s: float  # how long a push waits for the payer before it expires
    expiry_reason: str  # the reason an expired (abandoned) payment fails with
    decline_reasons: tuple[str, ...]
    callback_method: str
    check_credentials: Callable[[Mapping[str, str], bytes, Credentials], None]  # raises Rejected
    token_answer: Callable[[str, float], MockReply]
    authorize: Callable[[Mapping[str, str], Access], None]  # raises Rejected (401)
    read_payment: Callable[[Mapping[str, str], bytes], Payment]  # raises Rejected (400)
    accepted_answer: Callable[[Entry], MockReply]  # a new payment, pending or final
    duplicate_answer: Callable[[Entry], MockReply]
    sync_decline_answer: Callable[[Entry], MockReply]
    failure_answer: Callable[[], MockReply]
    status_answer: Callable[[Entry | None, str], MockReply]
    callback_body: Callable[[Entry, str | None], bytes]  # the entry is final; the secret signs
