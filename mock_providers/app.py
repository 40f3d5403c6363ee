"""The aiohttp application of a mock: token, payment and status routes, the background that
turns due payments final and sends their callbacks, admin, health, request log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn

from aiohttp import web

from mock_providers import callbacks
from mock_providers.api import MockReply, ProviderApi, Rejected
from mock_providers.callbacks import Callback, Courier, RetrySchedule
from mock_providers.faults import FaultConfig, Faults, InvalidFaultConfig, Outcome
from mock_providers.ledger import Approval, Ledger
from mock_providers.tokens import Access, Clock, Credentials, Tokens


@dataclass(frozen=True)
class MockOptions:
    """Settings fixed for the life of a mock (the faults can change while it runs)."""

    credentials: Credentials = dataclasses.field(default_factory=Credentials)
    token_ttl_s: float | None = None  # None: the provider's real token lifetime
    approval_timeout_s: float | None = None  # None: the provider's own
    sync_declines: bool = False
    callback_url: str | None = None  # for payments whose request names none
    callback_secret: str | None = None
    callback_retries: RetrySchedule = dataclasses.field(default_factory=RetrySchedule)


API = web.AppKey("api", ProviderApi)
OPTIONS = web.AppKey("options", MockOptions)
FAULTS = web.AppKey("faults", Faults)
LEDGER = web.AppKey("ledger", Ledger)
ACCESS = web.AppKey("access", Access)
APPROVAL = web.AppKey("approval", Approval)
COURIER = web.AppKey("courier", Courier)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
# Set when a payment is booked, so the background re-reads the next due time.
BOOKED = web.AppKey("booked", asyncio.Event)
HANGS = web.AppKey("hangs", set[asyncio.Future[None]])
# What the request log reports about a payment or status request, set by the handlers.
REFERENCE = web.RequestKey("reference", str)
OUTCOME = web.RequestKey("outcome", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    api: ProviderApi,
    config: FaultConfig,
    seed: int | None,
    options: MockOptions | None = None,
    clock: Clock = time.monotonic,
) -> web.Application:
    """A mock of `api`; serve it with handler_cancellation=True so a hang ends with its client."""
    options = options or MockOptions()
    app = web.Application(middlewares=[log_request])
    app[API] = api
    app[OPTIONS] = options
    app[FAULTS] = Faults(config, seed, api.decline_reasons)
    app[LEDGER] = ledger = Ledger()
    ttl_s = api.token_ttl_s if options.token_ttl_s is None else options.token_ttl_s
    app[ACCESS] = Access(options.credentials, Tokens(ttl_s, clock))
    timeout_s = (
        api.approval_timeout_s if options.approval_timeout_s is None else options.approval_timeout_s
    )
    app[APPROVAL] = Approval(api.expiry_reason, timeout_s, options.sync_declines)
    app[COURIER] = Courier(ledger.stats, options.callback_retries)
    app[CLOCK] = clock
    app[BOOKED] = asyncio.Event()
    app[HANGS] = set()
    app.cleanup_ctx.append(background)
    app.on_shutdown.append(drop_hung_requests)
    app.router.add_post(api.token_path, issue_token)
    app.router.add_post(api.payment_path, pay)
    app.router.add_get(api.status_path, payment_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/__mock/stats", stats)
    app.router.add_put("/__mock/config", configure)
    return app


async def background(app: web.Application) -> AsyncIterator[None]:
    """From start-up to shutdown: the callbacks' session and courier, and the settler."""
    async with callbacks.running(app[COURIER]):
        settler = asyncio.create_task(settle_when_due(app))
        yield
        settler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await settler


async def settle_when_due(app: web.Application) -> NoReturn:
    # Requests settle too (so an injected clock needs no background), but a callback must go out
    # when its payment turns final even if nobody asks.
    booked = app[BOOKED]
    while True:
        settle(app)
        next_due = app[LEDGER].next_due()
        timeout = None if next_due is None else max(0.0, next_due - app[CLOCK]())
        booked.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(booked.wait(), timeout)


def settle(app: web.Application) -> None:
    """Turn the payments that are due final, and send the callback of each that has one."""
    api, options = app[API], app[OPTIONS]
    for entry in app[LEDGER].settle(app[CLOCK]()):
        url = entry.payment.callback_url
        if url is not None:
            body = api.callback_body(entry, options.callback_secret)
            app[COURIER].send(Callback(url, api.callback_method, body))


async def issue_token(request: web.Request) -> web.Response:
    api, access, ledger = request.app[API], request.app[ACCESS], request.app[LEDGER]
    try:
        api.check_credentials(request.headers, await request.read(), access.credentials)
    except Rejected as rejected:
        return refuse(request, rejected)
    ledger.stats.tokens_issued += 1
    return respond(api.token_answer(access.tokens.issue(), access.tokens.ttl_s))


def authorize(request: web.Request) -> None:
    request.app[API].authorize(request.headers, request.app[ACCESS])


def refuse(request: web.Request, rejected: Rejected) -> web.Response:
    if rejected.unauthorized:
        request.app[LEDGER].stats.unauthorized += 1
    request[OUTCOME] = "rejected"
    return respond(rejected.answer)


async def pay(request: web.Request) -> web.Response:
    app = request.app
    api, ledger, approval = app[API], app[LEDGER], app[APPROVAL]
    ledger.stats.requests += 1
    try:
        authorize(request)
        payment = api.read_payment(request.headers, await request.read())
    except Rejected as rejected:
        return refuse(request, rejected)
    if payment.callback_url is None:
        payment = dataclasses.replace(payment, callback_url=app[OPTIONS].callback_url)
    request[REFERENCE] = payment.reference
    decision = app[FAULTS].decide()
    settle(app)  # so a repeat sees its payment's current state
    # Booked before the latency sleep, so a concurrent repeat of the reference is a duplicate.
    booking = ledger.book(payment, decision, app[CLOCK](), approval)
    request[OUTCOME] = booking.outcome
    settle(app)  # an instant approval is final before the POST is answered
    app[BOOKED].set()
    await asyncio.sleep(decision.latency_s)
    if booking.outcome == Outcome.HANG:
        await hang_until_the_client_leaves(app[HANGS])
    entry = booking.entry
    if entry is None:
        return respond(api.failure_answer())
    if booking.duplicate:
        return respond(api.duplicate_answer(entry))
    if booking.outcome == Outcome.DECLINE and approval.sync_declines:
        return respond(api.sync_decline_answer(entry))
    return respond(api.accepted_answer(entry))


async def hang_until_the_client_leaves(hangs: set[asyncio.Future[None]]) -> NoReturn:
    # The payment is already created (and charged once its payer approves); only the answer is
    # lost. The handler is cancelled when the client disconnects, or by drop_hung_requests at
    # shutdown, so no task outlives its connection.
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
        authorize(request)
    except Rejected as rejected:
        return refuse(request, rejected)
    if request.app[FAULTS].status_fails():
        request[OUTCOME] = Outcome.FAILURE
        return respond(api.failure_answer())
    settle(request.app)
    return respond(api.status_answer(request.app[LEDGER].find(reference), reference))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    settle(request.app)
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


def respond(answer: MockReply) -> web.Response:
    if answer.body is None:
        return web.Response(status=answer.status)
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
