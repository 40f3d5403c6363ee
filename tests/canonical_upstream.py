"""A provider speaking payagg's canonical protocol, for tests: seeded failures, hangs, counters.

`POST /pay` takes a payment; `GET /pay/{reference}` answers its state (404 when unknown). With
`pending_polls` N, a payment is answered PENDING and its status stays PENDING for N queries.

Run as a process (`python -m tests.canonical_upstream --port P --failure-rate 0.8 --seed 1`) or
in-process via `build_upstream()`. `GET /__stats` reports what it saw; `PUT /__control` changes
its behaviour while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class UpstreamState:
    failure_rate: float = 0.0
    decline: bool = False
    already_exists: bool = False  # answer 409, as a provider that already holds the reference
    delay_s: float = 0.0
    pending_polls: int = 0  # > 0: payments start PENDING, final after this many status queries
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    requests: int = 0
    references: list[str] = field(default_factory=list)
    answered: dict[str, bytes] = field(default_factory=dict)
    bodies: list[dict[str, object]] = field(default_factory=list)
    status_queries: int = 0
    polls_left: dict[str, int] = field(default_factory=dict)


STATE = web.AppKey("state", UpstreamState)


async def _pay(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.requests += 1
    body = await request.json()
    state.bodies.append(body)
    reference = request.headers.get("X-Reference-Id", "")
    state.references.append(reference)
    if state.delay_s:
        await asyncio.sleep(state.delay_s)
    if state.already_exists:
        return web.json_response({"error": "reference already exists"}, status=409)
    if reference in state.answered:
        return web.Response(body=state.answered[reference], content_type="application/json")
    if state.rng.random() < state.failure_rate:
        return web.json_response({"error": "simulated failure"}, status=500)
    if state.decline:
        answer = web.json_response({"status": "DECLINED", "reason": "INSUFFICIENT_FUNDS"})
    else:
        answer = web.json_response({"status": "SUCCESS", "provider_reference": f"up-{reference}"})
    assert isinstance(answer.body, bytes)
    state.answered[reference] = answer.body
    if state.pending_polls:
        state.polls_left[reference] = state.pending_polls
        return web.json_response({"status": "PENDING"})
    return answer


async def _status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.status_queries += 1
    reference = request.match_info["reference"]
    if reference not in state.answered:
        return web.json_response({"error": "unknown reference"}, status=404)
    if state.polls_left.get(reference, 0) > 0:
        state.polls_left[reference] -= 1
        return web.json_response({"status": "PENDING"})
    return web.Response(body=state.answered[reference], content_type="application/json")


async def _stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "requests": state.requests,
            "references": state.references,
            "status_queries": state.status_queries,
        }
    )


async def _control(request: web.Request) -> web.Response:
    state = request.app[STATE]
    changes = await request.json()
    state.failure_rate = float(changes.get("failure_rate", state.failure_rate))
    state.decline = bool(changes.get("decline", state.decline))
    state.delay_s = float(changes.get("delay_s", state.delay_s))
    state.pending_polls = int(changes.get("pending_polls", state.pending_polls))
    return web.json_response({"ok": True})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_upstream(state: UpstreamState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_post("/pay", _pay)
    app.router.add_get("/pay/{reference}", _status)
    app.router.add_get("/__stats", _stats)
    app.router.add_put("/__control", _control)
    app.router.add_get("/healthz", _healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    state = UpstreamState(failure_rate=args.failure_rate, rng=random.Random(args.seed))
    web.run_app(build_upstream(state), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
