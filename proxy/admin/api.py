"""`/admin/...` on the admin port: who may act, what they asked, and a log line for each action.

Every action needs the token (`Authorization: Bearer`), says who acts (`X-Admin-Actor`) and why
(`reason` in the body); both are logged with what was done, as JSON fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from proxy.admin.errors import (
    AdminBadRequest,
    AdminDisabled,
    AdminError,
    AdminNotFound,
    AdminUnauthorized,
)
from proxy.admin.reload import Actor, Reloader, ReloadTarget
from proxy.admin.shared import ForcedBreaker, SharedAdminState
from proxy.admin.sync import AdminSync
from proxy.admin.token import ADMIN_TOKEN_ENV, token_matches
from proxy.observability.metrics import GatewayMetrics
from proxy.providers.breaker import BreakerState, ProviderBreaker
from proxy.store.client import StoreClient

log = logging.getLogger("payagg.admin")

BREAKERS_PREFIX = "/admin/breakers/"
RELOAD_PATH = "/admin/reload"
ACTOR_HEADER = "X-Admin-Actor"
_ACTOR = re.compile(r"[A-Za-z0-9._@+:/ _-]{1,64}")
_MAX_REASON_CHARS = 500
_STATES = {"open": BreakerState.OPEN, "closed": BreakerState.CLOSED, "auto": None}


class AdminApi:
    """The admin actions of one process, and the background sync they rely on."""

    def __init__(
        self,
        gateway: ReloadTarget,
        breakers: Callable[[], Mapping[str, ProviderBreaker]],
        metrics: GatewayMetrics,
        store: StoreClient,
        prefix: str,
        token: str | None,
    ) -> None:
        self._breakers = breakers
        self._token = token
        self._shared = SharedAdminState(store, prefix)
        self.reloader = Reloader(gateway, metrics)
        self.sync = AdminSync(self._shared, breakers, metrics, self._follow_generation)
        self._signalled: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        await self.sync.stop()
        await self._shared.close()

    def describe_forced(self, provider: str) -> dict[str, Any]:
        """`forced` and, while it is, who forced the breaker, when and why (/v1/providers)."""
        held = self.sync.forced.get(provider)
        return {"forced": held is not None, **(held.describe() if held is not None else {})}

    async def force_breaker(self, request: web.BaseRequest, provider: str) -> web.Response:
        """POST /admin/breakers/{provider} {"state": "open"|"closed"|"auto", "reason"}."""
        actor, body = await self._authorised(request)
        name = self._provider_named(provider)
        state = body.get("state")
        if state not in _STATES:
            raise AdminBadRequest({"state": f"must be one of open, closed, auto, got {state!r}"})
        wanted = _STATES[state]
        held = None
        if wanted is not None:
            held = ForcedBreaker(wanted, actor.why, actor.who, _now_iso())
        await self._shared.force(name, held)
        self.sync.hold(name, held)  # here at once; every other process within a refresh
        _log_action("breaker", actor, provider=name, state=state)
        breaker = self._breakers()[name]
        return web.json_response(
            {
                "provider": name,
                "forced": held is not None,
                "state": breaker.state.value,
                **(held.describe() if held is not None else {}),
            }
        )

    async def reload(self, request: web.BaseRequest) -> web.Response:
        """POST /admin/reload {"reason"}: this process now, the others through Redis."""
        actor, _ = await self._authorised(request)
        answer = await self.reloader.reload(actor)
        if answer["status"] == "reloaded":
            answer["generation"] = await self._announce()
        return web.json_response(answer)

    def reload_on_signal(self) -> None:
        """SIGHUP: reload this process's file; a change is announced to the others too."""
        task = asyncio.get_running_loop().create_task(
            self._reload_quietly(Actor("SIGHUP", "signal"))
        )
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    async def _reload_quietly(self, actor: Actor) -> None:
        """A reload nobody waits for: its result is in the log and the metrics only."""
        try:
            answer = await self.reloader.reload(actor)
        except AdminError:
            return  # counted and logged by the reload
        except Exception:
            log.exception("reload on SIGHUP failed; the running config stays")
            return
        if answer["status"] == "reloaded":
            await self._announce()

    async def _announce(self) -> int | None:
        """A new generation, so every process and task re-reads its file; None when Redis
        cannot take it (this process reloaded, the others did not hear of it)."""
        try:
            generation = await self._shared.next_generation()
        except AdminError as error:
            log.warning("reload not announced to the other processes: %s", error)
            return None
        self.sync.seen_generation(generation)
        return generation

    async def _follow_generation(self, generation: int) -> None:
        actor = Actor(f"config generation {generation}", "another process reloaded")
        with contextlib.suppress(AdminError):  # counted and logged by the reload
            await self.reloader.reload(actor)

    async def _authorised(self, request: web.BaseRequest) -> tuple[Actor, dict[str, Any]]:
        if self._token is None:
            raise AdminDisabled(ADMIN_TOKEN_ENV)
        if not token_matches(request.headers.get("Authorization", ""), self._token):
            log.warning(
                "admin: refused a request without the admin token",
                extra={"fields": {"path": request.path, "remote": request.remote}},
            )
            raise AdminUnauthorized()
        body = await _json_object(request)
        problems = {}
        who = request.headers.get(ACTOR_HEADER, "")
        if not _ACTOR.fullmatch(who):
            problems[ACTOR_HEADER] = (
                "is required: who acts, 1-64 letters, digits, spaces or _.@+:/-"
                if not who
                else f"must be 1-64 letters, digits, spaces or _.@+:/-, got {who[:80]!r}"
            )
        why = body.get("reason")
        if not isinstance(why, str) or not why.strip():
            problems["reason"] = "is required: a non-empty string saying why"
        elif len(why) > _MAX_REASON_CHARS:
            problems["reason"] = f"must be at most {_MAX_REASON_CHARS} characters, got {len(why)}"
        if problems:
            raise AdminBadRequest(problems)
        return Actor(who, str(why).strip()), body

    def _provider_named(self, given: str) -> str:
        for name in self._breakers():
            if name.lower() == given.lower():
                return name
        raise AdminNotFound(f"no provider named {given!r} is configured")


async def _json_object(request: web.BaseRequest) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise AdminBadRequest({"body": "must be a JSON object"}) from None
    if not isinstance(body, dict):
        raise AdminBadRequest({"body": "must be a JSON object"})
    return body


def _log_action(action: str, actor: Actor, **details: str) -> None:
    log.warning(
        "admin: %s by %s (%s): %s",
        action,
        actor.who,
        actor.why,
        " ".join(f"{key}={value}" for key, value in details.items()),
        extra={
            "fields": {"admin_action": action, "actor": actor.who, "reason": actor.why, **details}
        },
    )


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
