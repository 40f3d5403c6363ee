"""The aiohttp application of a mock: payment and status routes, admin, health, request log."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import NoReturn

from aiohttp import web

from mock_providers.api import Answer, ProviderApi, Rejected
from mock_providers.faults import FaultConfig, Faults, InvalidFaultConfig, Outcome
from mock_providers.ledger import Ledger

API = web.AppKey("api", ProviderApi)
FAULTS = web.AppKey("faults", Faults)
LEDGER = web.AppKey("ledger", Ledger)
HANGS = web.AppKey("hangs", set[asyncio.Future[None]])
# What the request log reports about a payment or status request, set by the handlers.
REFERENCE = web.RequestKey("reference", str)
OUTCOME = web.RequestKey("outcome", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(api: ProviderApi, config: FaultConfig, seed: int | None) -> web.Application:
    """A mock of `api`; serve it with handler_cancellation=True so a hang ends with its client."""
    app = web.Application(middlewares=[log_request])
    app[API] = api
    app[FAULTS] = Faults(config, seed, api.decline_reasons)
    app[LEDGER] = Ledger()
    app[HANGS] = set()
    app.on_shutdown.append(drop_hung_requests)
    app.router.add_post(api.payment_path, pay)
    app.router.add_get(api.status_path, payment_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/__mock/stats", stats)
    app.router.add_put("/__mock/config", configure)
    return app


async def pay(request: web.Request) -> web.Response:
    api, ledger = request.app[API], request.app[LEDGER]
    ledger.stats.requests += 1
    try:
        api.authorize(request.headers)
        payment = api.read_payment(request.headers, await request.read())
    except Rejected as rejected:
        request[OUTCOME] = "rejected"
        return respond(rejected.answer)
    request[REFERENCE] = payment.reference
    decision = request.app[FAULTS].decide()
    # Booked before the latency sleep, so a concurrent repeat of the reference is a duplicate.
    booking = ledger.book(payment, decision)
    request[OUTCOME] = booking.outcome
    await asyncio.sleep(decision.latency_s)
    if booking.outcome == Outcome.HANG:
        await hang_until_the_client_leaves(request.app[HANGS])
    if booking.entry is None:
        return respond(api.failure_answer())
    return respond(api.payment_answer(booking.entry))


async def hang_until_the_client_leaves(hangs: set[asyncio.Future[None]]) -> NoReturn:
    # The payment is already charged; only the answer is lost. The handler is cancelled when the
    # client disconnects, or by drop_hung_requests at shutdown, so no task outlives its connection.
    never = asyncio.get_running_loop().create_future()
    hangs.add(never)
    try:
        await never
    finally:
        hangs.discard(never)
    raise AssertionError("a hung request only ever ends by cancellation")


async def drop_hung_requests(app: web.Application) -> None:
    # Without this, shutdown would wait its whole timeout for answers that never come; the
    # connections close unanswered, as a crashed provider's would.
    for never in app[HANGS]:
        never.cancel()


async def payment_status(request: web.Request) -> web.Response:
    api = request.app[API]
    reference = request.match_info["reference"]
    request[REFERENCE] = reference
    try:
        api.authorize(request.headers)
    except Rejected as rejected:
        return respond(rejected.answer)
    return respond(api.status_answer(request.app[LEDGER].find(reference), reference))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    return json_response(request.app[LEDGER].stats.as_json())


async def configure(request: web.Request) -> web.Response:
    faults = request.app[FAULTS]
    try:
        faults.config = faults.config.updated(await read_changes(request))
    except InvalidFaultConfig as bad:
        return json_response(
            {"error": "invalid_config", "field": bad.field, "message": bad.problem}, status=400
        )
    return json_response(faults.config.as_json())


async def read_changes(request: web.Request) -> dict[str, object]:
    try:
        changes = json.loads(await request.read())
    except ValueError:
        raise InvalidFaultConfig(None, "body is not valid JSON") from None
    if not isinstance(changes, dict):
        raise InvalidFaultConfig(None, "body must be a JSON object")
    return changes


def respond(answer: Answer) -> web.Response:
    return json_response(answer.body, status=answer.status)


@web.middleware
async def log_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One JSON line per request on stdout; a hung request logs status null when it ends."""
    started = time.monotonic()
    status: int | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as http_error:
        status = http_error.status
        raise
    finally:
        line: dict[str, object] = {
            "msg": "request",
            "provider": request.app[API].name,
            "method": request.method,
            "path": request.path,
            "reference": request.get(REFERENCE),
            "outcome": request.get(OUTCOME),
            "status": status,
            "latency_ms": round((time.monotonic() - started) * 1000, 1),
        }
        write_log_line(line)


def json_response(body: object, status: int = 200) -> web.Response:
    """A compact JSON body, as the proxy answers."""
    return web.json_response(body, status=status, dumps=_compact)


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def write_log_line(fields: dict[str, object]) -> None:
    """One compact JSON line on stdout with `ts` and `level` first, as the proxy writes them."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    sys.stdout.write(_compact({"ts": now, "level": "info", **fields}))
    sys.stdout.write("\n")
    sys.stdout.flush()
