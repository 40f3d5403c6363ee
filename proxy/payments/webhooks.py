"""Merchant webhooks out: every final state POSTed, signed, at least once (CONTRACT §2).

Life's transition scripts enqueue a webhook in the same atomic step that makes a payment final
(`proxy/store/outbox.py`). Every proxy process runs one `WebhookDelivery` loop: it leases due
deliveries shard by shard, POSTs each with a fresh `Payagg-Signature`, then removes it (2xx) or
schedules the next attempt with exponential backoff and jitter (anything else), until
`webhooks.retry_for_s` after the payment became final. A delivery lives in Redis only, so a
process that stops or dies mid-attempt loses nothing: its lease ends and another process, or
the next one, sends it again. "At least once": a receiver may see a webhook twice (an answer
lost on the way back, a lease that ended), so it deduplicates on transaction id and state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from proxy.observability.metrics import GatewayMetrics
from proxy.settings.clients import ClientWebhook
from proxy.settings.config import WebhookSettings
from proxy.store.client import RedisReplyError, RedisUnavailable
from proxy.store.outbox import HookRecord, Lease, Outbox

log = logging.getLogger("payagg.webhooks")

SIGNATURE_HEADER = "Payagg-Signature"


@dataclass(frozen=True)
class DeliveryTiming:
    """How often the loop looks for due deliveries, and how long an attempt may take."""

    poll_interval_s: float = 1.0
    # Bound on one POST, connecting included: a receiver that hangs costs this, not a lease.
    timeout_s: float = 10.0
    # Longer than an attempt and its settling, so a lease never ends while its holder is alive.
    lease_s: float = 30.0
    first_retry_s: float = 1.0
    max_retry_interval_s: float = 900.0
    # Attempts in flight at once per process; the others stay in Redis, due.
    concurrency: int = 32

    def __post_init__(self) -> None:
        if self.lease_s <= self.timeout_s:
            raise ValueError("lease_s must exceed timeout_s: a lease must outlive its attempt")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`."""
    digest = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class WebhookDelivery:
    """One process's delivery loop: started with the server, stopped with it."""

    def __init__(
        self,
        settings: WebhookSettings,
        outbox: Outbox,
        metrics: GatewayMetrics,
        timing: DeliveryTiming = DeliveryTiming(),
        clock: Callable[[], float] = time.time,
        jitter: random.Random | None = None,
        client_targets: Mapping[str, ClientWebhook] | None = None,
    ) -> None:
        self.settings = settings
        # Clients with a webhook target of their own; the others' payments go to `settings`.
        self._client_targets = dict(client_targets or {})
        self._outbox = outbox
        self._metrics = metrics
        self._timing = timing
        self._clock = clock
        self._jitter = jitter or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._next_shard = 0

    @property
    def enabled(self) -> bool:
        """False without `webhooks.url` or a client's webhook: nothing is enqueued then, nor
        delivered."""
        return bool(self.settings.url or self._client_targets)

    def start(self) -> None:
        """Starts the loop in the running event loop (no-op without a webhook URL)."""
        if not self.enabled or self._loop_task is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timing.timeout_s),
            # The same egress proxy as provider calls (HTTPS_PROXY, NO_PROXY).
            trust_env=True,
        )
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, timeout_s: float) -> None:
        """Stops leasing, lets attempts in flight finish for up to `timeout_s`, drops the rest.

        A dropped attempt is not lost: its lease ends and the delivery is due again.
        """
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._attempts:
            _, unfinished = await asyncio.wait(self._attempts, timeout=timeout_s)
            for attempt in unfinished:
                attempt.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._outbox.close()

    async def refresh_backlog(self) -> None:
        """Sets `payagg_webhook_backlog` from the store (before a scrape)."""
        try:
            self._metrics.webhook_backlog.set(await self._outbox.backlog())
        except (RedisUnavailable, RedisReplyError) as error:
            log.warning("cannot read the webhook backlog: %s", error)

    async def lease_due(self) -> int:
        """Leases what is due, up to the free attempt slots, and starts each attempt.

        Shards are visited from a rotating start, so a large backlog in one never starves the
        others. Returns how many attempts were started.
        """
        started = 0
        now_ms = self._now_ms()
        shards = self._outbox.shards()
        for offset in range(len(shards)):
            room = self._timing.concurrency - len(self._attempts)
            if room <= 0:
                break
            shard = shards[(self._next_shard + offset) % len(shards)]
            for member in await self._outbox.due(shard, now_ms, room):
                lease = await self._outbox.lease(
                    shard, member, now_ms, now_ms + int(self._timing.lease_s * 1000)
                )
                if lease is not None:
                    self._begin(lease)
                    started += 1
        self._next_shard = (self._next_shard + 1) % len(shards)
        return started

    async def _run(self) -> None:
        while True:
            try:
                await self.lease_due()
            except RedisUnavailable as error:
                log.warning("cannot lease webhook deliveries: %s", error)
            except Exception:
                # The loop outlives any one failure: a delivery left behind is due again later.
                log.exception("webhook delivery loop failed; trying again")
            await asyncio.sleep(self._timing.poll_interval_s)

    def _begin(self, lease: Lease) -> None:
        attempt = asyncio.get_running_loop().create_task(self._attempt(lease))
        self._attempts.add(attempt)
        attempt.add_done_callback(self._attempts.discard)

    async def _attempt(self, lease: Lease) -> None:
        # Whatever goes wrong here, the delivery stays in Redis: its lease ends and it is
        # attempted again (at least once, perhaps twice).
        try:
            failure = await self._post(lease.record)
            if failure is None:
                await self._outbox.delivered(lease)
                self._metrics.webhook_deliveries.labels("delivered").inc()
            else:
                await self._after_failure(lease, failure)
        except (RedisUnavailable, RedisReplyError) as error:
            log.warning(
                "webhook attempt not recorded: %s", error, extra={"fields": _about(lease.record)}
            )
        except Exception:
            log.exception("webhook attempt failed", extra={"fields": _about(lease.record)})

    async def _post(self, record: HookRecord) -> str | None:
        """None when the receiver answered 2xx, else what went wrong."""
        assert self._session is not None
        url, secret = self._target(record.target)
        if not url:
            return f"no webhook target for client {record.target!r} (nor a `webhooks.url`)"
        body = record.body
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(secret, int(self._clock()), body),
        }
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                # A redirect is not followed: the signed body goes to the configured URL only.
                return None if 200 <= answer.status < 300 else f"answered {answer.status}"
        except TimeoutError:
            return f"no answer within {self._timing.timeout_s:g}s"
        except aiohttp.ClientError as error:
            return f"{type(error).__name__}: {error}"

    async def _after_failure(self, lease: Lease, failure: str) -> None:
        record = lease.record
        now_ms = self._now_ms()
        give_up_at_ms = record.created_ms + int(self.settings.retry_for_s * 1000)
        fields = {**_about(record), "attempts": record.attempts + 1, "failure": failure}
        if now_ms >= give_up_at_ms:
            if await self._outbox.give_up(lease):
                self._metrics.webhook_deliveries.labels("expired").inc()
                log.error(
                    "webhook for %s %s given up after %gs of failed attempts: %s",
                    fields["transaction_id"],
                    fields["state"],
                    self.settings.retry_for_s,
                    failure,
                    extra={"fields": fields},
                )
            return
        # The last attempt is made at the deadline itself rather than skipped.
        next_ms = min(now_ms + self._backoff_ms(record.attempts), give_up_at_ms)
        await self._outbox.retry(lease, next_ms, record.failed_once_more())
        self._metrics.webhook_deliveries.labels("failed").inc()
        log.warning(
            "webhook for %s %s failed, next attempt in %.1fs: %s",
            fields["transaction_id"],
            fields["state"],
            (next_ms - now_ms) / 1000,
            failure,
            extra={"fields": fields},
        )

    def _target(self, client: str | None) -> tuple[str, str]:
        """URL and secret for a payment of `client`: its own target, else `webhooks:`."""
        own = self._client_targets.get(client) if client is not None else None
        if own is not None:
            return own.url, own.secret
        return self.settings.url, self.settings.secret

    def _backoff_ms(self, failed_before: int) -> int:
        """Doubling from `first_retry_s` up to `max_retry_interval_s`, each 50-100% of it.

        The jitter spreads the retries of many webhooks that failed together (a receiver
        outage) instead of sending them all back at the same moment.
        """
        ceiling = min(
            self._timing.first_retry_s * 2 ** min(failed_before, 32),
            self._timing.max_retry_interval_s,
        )
        return int(ceiling * self._jitter.uniform(0.5, 1.0) * 1000)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


def _about(record: HookRecord) -> dict[str, object]:
    """The log fields naming a delivery: its payment's transaction id and state."""
    try:
        body = json.loads(record.body)
        return {"transaction_id": body.get("transaction_id"), "state": body.get("state")}
    except (ValueError, AttributeError):
        return {"transaction_id": None, "state": None}
