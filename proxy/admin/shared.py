"""What every process and task must agree on, in one Redis hash: forced breakers and the
config generation (`proxy/store/keys.py`, `admin_key`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from proxy.admin.errors import AdminStoreUnavailable
from proxy.providers.breaker import BreakerState
from proxy.store.client import RedisReplyError, RedisUnavailable, StoreClient
from proxy.store.keys import admin_key

_BREAKER_FIELD = "breaker:"
_GENERATION_FIELD = "config_generation"


@dataclass(frozen=True, slots=True)
class ForcedBreaker:
    """An operator's hold on one provider's breaker."""

    state: BreakerState
    reason: str
    by: str
    at: str  # ISO 8601 UTC, when it was set

    def describe(self) -> dict[str, str]:
        return {"forced_reason": self.reason, "forced_by": self.by, "forced_at": self.at}


@dataclass(frozen=True, slots=True)
class AdminSnapshot:
    forced: dict[str, ForcedBreaker]
    generation: int


class SharedAdminState:
    """Reads and writes the admin hash; Redis failures become AdminStoreUnavailable."""

    def __init__(self, client: StoreClient, prefix: str) -> None:
        self._client = client
        self._key = admin_key(prefix)

    async def read(self) -> AdminSnapshot:
        reply = await self._run("HGETALL", self._key)
        pairs = (
            reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
        )
        forced: dict[str, ForcedBreaker] = {}
        generation = 0
        for raw_field, raw_value in pairs:
            field, value = _text(raw_field), _text(raw_value)
            if field == _GENERATION_FIELD:
                generation = int(value)
            elif field.startswith(_BREAKER_FIELD):
                held = json.loads(value)
                forced[field[len(_BREAKER_FIELD) :]] = ForcedBreaker(
                    BreakerState(held["state"]), held["reason"], held["by"], held["at"]
                )
        return AdminSnapshot(forced, generation)

    async def force(self, provider: str, held: ForcedBreaker | None) -> None:
        """Hold `provider`'s breaker, or (None) hand it back to its window."""
        field = _BREAKER_FIELD + provider
        if held is None:
            await self._run("HDEL", self._key, field)
        else:
            await self._run("HSET", self._key, field, json.dumps(asdict(held)))

    async def next_generation(self) -> int:
        """Tell every process to re-read its config file; returns the new generation."""
        return int(await self._run("HINCRBY", self._key, _GENERATION_FIELD, "1"))

    async def close(self) -> None:
        await self._client.close()

    async def _run(self, *command: str | bytes) -> Any:
        try:
            return await self._client.execute(*command)
        except (RedisUnavailable, RedisReplyError) as error:
            raise AdminStoreUnavailable(f"Redis cannot be reached: {error}") from error


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
