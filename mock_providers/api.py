"""What each mock provider module supplies: its routes, request parsing and answer formats."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mock_providers.ledger import Entry, Payment

JsonBody = dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """An HTTP status and the JSON body that goes with it."""

    status: int
    body: JsonBody


class Rejected(Exception):
    """A request refused before any fault is drawn (400, 401), with the provider's answer."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status, answer.body)
        self.answer = answer


@dataclass(frozen=True)
class ProviderApi:
    """One provider's dialect; the shared behaviour (faults, dedupe, admin) lives in app.py."""

    name: str
    default_port: int
    payment_path: str
    status_path: str  # an aiohttp route with a `{reference}` part
    decline_reasons: tuple[str, ...]
    authorize: Callable[[Mapping[str, str]], None]  # raises Rejected (401)
    read_payment: Callable[[Mapping[str, str], bytes], Payment]  # raises Rejected (400)
    payment_answer: Callable[[Entry], Answer]
    failure_answer: Callable[[], Answer]
    status_answer: Callable[[Entry | None, str], Answer]
