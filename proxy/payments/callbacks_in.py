"""`PUT`/`POST /v1/callbacks/{provider}/{token}`: a provider's callback, taken as a hint.

The URL's token (an HMAC of the provider reference, `proxy/providers/callbacks.py`) finds the
payment and proves the caller was given its URL; the provider's own check (YAML `callback:`)
comes on top: 401 otherwise, nothing changed. A provider that calls one configured URL (Airtel:
`callback.reference`) calls its static URL instead, and the payment is found by the reference in
the body, which the provider's HMAC authenticates. A callback never sets a state: it only makes
the payment due for a status query now (or tells whoever holds it to look again at once) and
wakes a handler of this process waiting for it, so a forged or replayed callback cannot mark it
paid.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping

from aiohttp import web

from proxy.errors import CallbackUnauthorized, InvalidRequest, NotFound
from proxy.payments.json_answer import json_answer
from proxy.payments.lifecycle import SETTLED, Lifecycle, now_ms
from proxy.payments.wakeups import Wakeups
from proxy.providers.upstream import ProviderClient
from proxy.store.keys import Shard, reference_key

log = logging.getLogger("payagg.callbacks")

CALLBACK_PREFIX = "/v1/callbacks/"
CALLBACK_ROUTE = CALLBACK_PREFIX + "{provider}/{token}"
# What a callback's state means, for the log of a callback contradicting a settled payment.
_SAYS_SUCCESS = frozenset({"SUCCESS", "SUCCESSFUL", "TS", "COMPLETED"})
_SAYS_DECLINED = frozenset({"FAILED", "DECLINED", "REJECTED", "TF", "CANCELLED"})


class CallbackService:
    def __init__(
        self, providers: Mapping[str, ProviderClient], lifecycle: Lifecycle, wakeups: Wakeups
    ) -> None:
        self._providers = {name.lower(): client for name, client in providers.items()}
        self._lifecycle = lifecycle
        self._wakeups = wakeups

    async def receive(
        self, request: web.BaseRequest, provider_name: str, token: str
    ) -> web.Response:
        provider = self._providers.get(provider_name.lower())
        if provider is None:
            raise NotFound("no such provider")
        raw = await request.read()
        if not provider.authenticate_callback(request.method, request.headers, raw):
            raise CallbackUnauthorized(f"the callback does not pass {provider.name}'s own check")
        sha, number = await self._find(provider, token, raw)
        lifecycle = self._lifecycle
        shard = Shard(lifecycle.prefix, number)
        with lifecycle.errors:
            poked = await lifecycle.records.poke(shard, sha, now_ms())
            if poked:
                await self._log_contradiction(provider, shard, sha, raw)
        self._wakeups.wake(sha)
        return json_answer({"status": "accepted"})

    async def _find(self, provider: ProviderClient, token: str, raw: bytes) -> tuple[str, int]:
        """(sha, shard number) of the payment a callback is about: by the URL's token, or, on
        the provider's static URL, by the reference its (authenticated) body names."""
        static = provider.static_callback_url()
        if static is None or not _same(_token_of(static), token):
            found = await self._lookup(provider, token)
            if found is None:
                raise CallbackUnauthorized("no payment has this callback URL")
            return found
        reference = provider.callback_reference(raw)
        if reference is None:
            raise InvalidRequest({"body": "names no payment"}, f"{provider.name}'s callback")
        # The lookup the payment's own callback URL would make.
        found = await self._lookup(provider, _token_of(provider.callback_url(reference) or ""))
        if found is None:
            raise NotFound(f"{provider.name} has no payment with this reference")
        return found

    async def _lookup(self, provider: ProviderClient, token: str) -> tuple[str, int] | None:
        lifecycle = self._lifecycle
        with lifecycle.errors:
            found = await lifecycle.records.find_callback(
                reference_key(lifecycle.prefix, provider.name, token)
            )
        if found is None:
            return None
        sha, number, reference = found
        if not _same(_token_of(provider.callback_url(reference) or ""), token):
            raise CallbackUnauthorized("the callback URL's token does not match")
        return sha, number

    async def _log_contradiction(
        self, provider: ProviderClient, shard: Shard, sha: str, raw: bytes
    ) -> None:
        said = (provider.callback_state(raw) or "").upper()
        says = "SUCCESS" if said in _SAYS_SUCCESS else "DECLINED" if said in _SAYS_DECLINED else ""
        if not says:
            return
        record = await self._lifecycle.read(sha, shard)
        if record is not None and record.name in SETTLED and record.name != says:
            self._lifecycle.conflict(record, says, f"callback says {said}")


def _token_of(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
