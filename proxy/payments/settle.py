"""Waiting for a payment the provider has to become final, by asking its status endpoint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from proxy.errors import OutcomeUnknown, PaymentError, ProviderMismatch, ProviderUnavailable
from proxy.mapping import FINAL_OUTCOMES, Answer
from proxy.payment import Payment
from proxy.upstream import ProviderClient

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 1.0


async def wait_for_final(
    client: ProviderClient,
    payment: Payment,
    reference: str,
    wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Answer:
    """The payment's final answer (success or declined) from the provider's status endpoint,
    asked at once, then after 50 ms doubling to 1 s, for at most `wait_s`.

    Raises OutcomeUnknown when it is still pending then, or when the provider cannot be asked
    (breaker open, not found after its `not_found_grace_s`): the outcome is not guessed.
    Raises ProviderMismatch for an answer about another amount or currency.
    """
    started = clock()
    delay = FIRST_DELAY_S
    while True:
        try:
            answer: Answer | None = await client.query_status(reference)
        except ProviderUnavailable:
            break
        except PaymentError:
            answer = None  # a failed query changes nothing: ask again
        if answer is not None and answer.outcome in FINAL_OUTCOMES:
            if answer.contradicts(payment.amount, payment.currency):
                client.report_mismatch(answer, payment, reference)
                raise ProviderMismatch()
            return answer
        not_found = answer is not None and answer.outcome == "not_found"
        if not_found and clock() - started >= client.not_found_grace_s:
            break
        remaining = started + wait_s - clock()
        if remaining <= 0:
            break
        await sleep(min(delay, remaining))
        delay = min(delay * 2, MAX_DELAY_S)
    raise OutcomeUnknown(
        client.name,
        f"{client.name} has not settled the payment within {wait_s:g}s; its outcome is not "
        "known yet: retry with the same TransactionID",
    )
