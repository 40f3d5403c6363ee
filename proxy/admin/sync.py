"""Each process's view of the admin hash, refreshed in the background.

Every `REFRESH_INTERVAL_S` the process reads the hash: forced breakers are applied to its own
breakers, and a new config generation (another process or task reloaded) makes it re-read its
own file. Polling rather than pub/sub: nothing is missed across a reconnect, and a Redis outage
keeps the last forced states known (a maintenance hold must not lift because Redis blinked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from proxy.admin.errors import AdminStoreUnavailable
from proxy.admin.shared import AdminSnapshot, ForcedBreaker, SharedAdminState
from proxy.observability.metrics import GatewayMetrics
from proxy.providers.breaker import ProviderBreaker

log = logging.getLogger("payagg.admin")

# A forced state reaches every process within this (the admin API promises 1 s).
REFRESH_INTERVAL_S = 0.5


class AdminSync:
    """Applies the shared admin state to this process."""

    def __init__(
        self,
        shared: SharedAdminState,
        breakers: Callable[[], Mapping[str, ProviderBreaker]],
        metrics: GatewayMetrics,
        on_new_generation: Callable[[int], Awaitable[None]],
    ) -> None:
        self._shared = shared
        self._breakers = breakers
        self._metrics = metrics
        self._on_new_generation = on_new_generation
        self.forced: dict[str, ForcedBreaker] = {}
        self._generation: int | None = None
        self._holds = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Read the hash once and apply it; raises AdminStoreUnavailable (the last state stays)."""
        holds_before = self._holds
        snapshot = await self._shared.read()
        # A read begun before this process wrote a change of its own may predate it.
        if self._holds == holds_before:
            self.forced = snapshot.forced
            self.apply()
        await self._follow(snapshot)

    def seen_generation(self, generation: int) -> None:
        """This process made `generation` itself: nothing to re-read for it."""
        self._generation = max(self._generation or 0, generation)

    def hold(self, provider: str, held: ForcedBreaker | None) -> None:
        """A change this process wrote to Redis itself, applied without waiting for a refresh."""
        self._holds += 1
        self.forced = {name: hold for name, hold in self.forced.items() if name != provider}
        if held is not None:
            self.forced[provider] = held
        self.apply()

    def apply(self) -> None:
        """Hold or release each breaker as the last known forced states say."""
        for name, breaker in self._breakers().items():
            held = self.forced.get(name)
            wanted = held.state if held is not None else None
            if breaker.forced is not wanted:
                breaker.forced = wanted
                self._metrics.show_forced(name, wanted)
                log.warning(
                    "circuit breaker %s: %s",
                    name,
                    f"held {wanted.value} by an operator" if wanted else "back to its window",
                    extra={
                        "fields": {
                            "provider": name,
                            "forced": wanted,
                            **(held.describe() if held is not None else {}),
                        }
                    },
                )
            # The gauge shows what callers see, even after a window transition underneath.
            self._metrics.show_state(name, breaker.state)

    async def _follow(self, snapshot: AdminSnapshot) -> None:
        known, self._generation = self._generation, max(self._generation or 0, snapshot.generation)
        if known is not None and snapshot.generation > known:
            await self._on_new_generation(snapshot.generation)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
            except AdminStoreUnavailable as error:
                if not failing:
                    log.warning(
                        "admin state not refreshed, the last forced breakers stay: %s", error
                    )
                failing = True
            except Exception:
                if not failing:
                    log.exception("admin state refresh failed; the last forced breakers stay")
                failing = True
            else:
                failing = False
            await asyncio.sleep(REFRESH_INTERVAL_S)
