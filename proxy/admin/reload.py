"""Whether a re-read config file may replace the running one, and replacing it.

A provider whose payments are not final yet (PROCESSING, PENDING, UNRESOLVED) must keep being
asked where they were sent: a reload that removes, renames or re-targets it (another host, or
another environment of the same API) is refused with the count. Sections the process built its
listeners and Redis clients from (`server`, `redis`, `idempotency`, `webhooks`) keep their
running values until a restart; the answer names those that changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from proxy.admin.errors import AdminStoreUnavailable, ConfigInvalid, ReloadRefused
from proxy.errors import StoreUnavailable
from proxy.observability.metrics import GatewayMetrics
from proxy.settings.config import ConfigError, GatewayConfig, Provider, load_config

log = logging.getLogger("payagg.admin")

# Sections applied only at start-up: listeners, Redis clients, the webhook sender and the clients'
# gate (keys, rate limits, scopes) are built once.
RESTART_SECTIONS = ("server", "redis", "idempotency", "webhooks", "auth", "clients")
# Headers that select which of a provider's environments a request reaches (MTN's sandbox or a
# market, Airtel's country): changing one re-targets the provider as a new host does.
TARGET_HEADERS = frozenset({"x-target-environment", "x-country"})


class ReloadTarget(Protocol):
    """The running gateway, as a reload sees it (`proxy.server.app.Gateway`)."""

    config: GatewayConfig

    def use_config(self, config: GatewayConfig) -> None: ...

    async def pending_payments(self) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for an admin action, and why (both logged with it)."""

    who: str
    why: str


def target(provider: Provider) -> tuple[Any, ...]:
    """Where a provider's payments go: the origins of its URLs and its environment headers."""
    settings = provider.settings
    urls = [settings.url] + ([settings.status.url] if settings.status is not None else [])
    headers = {
        **(settings.request.headers if settings.request is not None else {}),
        **(settings.status.headers if settings.status is not None else {}),
    }
    return (
        tuple(_origin(url) for url in urls),
        tuple(sorted((k.lower(), v) for k, v in headers.items() if k.lower() in TARGET_HEADERS)),
    )


def moved_providers(old: GatewayConfig, new: GatewayConfig) -> dict[str, str]:
    """Each running provider the new file removes (or renames) or re-targets, with which."""
    after = {provider.name: provider for provider in new.providers}
    moved = {}
    for provider in old.providers:
        replacement = after.get(provider.name)
        if replacement is None:
            moved[provider.name] = "removed"
        elif target(replacement) != target(provider):
            moved[provider.name] = "re-targeted"
    return moved


class Reloader:
    """One reload at a time per process: read, check, apply, count, log.

    A file whose text is unchanged is not reloaded (nor counted): a change of a file it only
    names (a TLS certificate) needs a restart.
    """

    def __init__(self, gateway: ReloadTarget, metrics: GatewayMetrics) -> None:
        self._gateway = gateway
        self._metrics = metrics
        self._lock = asyncio.Lock()

    async def reload(self, actor: Actor) -> dict[str, Any]:
        """The answer's body once applied; raises ConfigInvalid, ReloadRefused or
        AdminStoreUnavailable (pending payments could not be counted), counted and logged."""
        async with self._lock:
            try:
                answer = await self._reload()
            except (ConfigInvalid, ReloadRefused, AdminStoreUnavailable) as refused:
                result = "invalid" if isinstance(refused, ConfigInvalid) else "refused"
                self._metrics.config_reloads.labels(result).inc()
                _log_reload(actor, result, refused.body())
                raise
            if answer["status"] == "reloaded":
                self._metrics.config_reloads.labels("ok").inc()
                _log_reload(actor, "ok", answer)
            return answer

    async def _reload(self) -> dict[str, Any]:
        running = self._gateway.config
        try:
            loaded = load_config(running.source)
        except ConfigError as error:
            raise ConfigInvalid(error.problems) from None
        if loaded.content_sha256 == running.content_sha256:
            # The same text: nothing to do (each worker hears of a reload twice, by SIGHUP and
            # through Redis; only the first one reloads).
            return {
                "status": "unchanged",
                "config": running.source,
                "config_hash": running.content_sha256,
            }
        moved = moved_providers(running, loaded)
        if moved:
            await self._refuse_if_pending(moved)
        kept = {name: getattr(running, name) for name in RESTART_SECTIONS}
        restart = [name for name, value in kept.items() if getattr(loaded, name) != value]
        self._gateway.use_config(dataclasses.replace(loaded, **kept))
        self._metrics.show_build(loaded.content_sha256)
        before = {provider.name: provider for provider in running.providers}
        after = {provider.name: provider for provider in loaded.providers}
        return {
            "status": "reloaded",
            "config": loaded.source,
            "config_hash": loaded.content_sha256,
            "providers": list(after),
            "added": [name for name in after if name not in before],
            "removed": [name for name in before if name not in after],
            "changed": [
                name
                for name, provider in after.items()
                if name in before and before[name].settings != provider.settings
            ],
            "needs_restart": restart,
        }

    async def _refuse_if_pending(self, moved: Mapping[str, str]) -> None:
        try:
            pending = await self._gateway.pending_payments()
        except StoreUnavailable:
            raise AdminStoreUnavailable(
                f"the file removes or re-targets {', '.join(moved)}, and their payments not "
                "final cannot be counted while Redis is unreachable"
            ) from None
        stuck = {name: pending.get(name, 0) for name in moved if pending.get(name, 0) > 0}
        if stuck:
            listed = ", ".join(f"{name} ({moved[name]}): {count}" for name, count in stuck.items())
            raise ReloadRefused(
                f"payments not final yet must be settled where they were sent: {listed}",
                pending=stuck,
            )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


def _log_reload(actor: Actor, result: str, details: Mapping[str, Any]) -> None:
    level = logging.INFO if result == "ok" else logging.WARNING
    log.log(
        level,
        "admin: config reload by %s (%s): %s",
        actor.who,
        actor.why,
        result,
        extra={
            "fields": {
                "admin_action": "reload",
                "actor": actor.who,
                "reason": actor.why,
                "result": result,
                **details,
            }
        },
    )
