"""The obvious POST /v1/pay, for `make bench`: what a competent team writes first, untuned.

aiohttp's web.Application, redis-py asyncio (SET NX EX claims the key, a final SET stores the
answer), aiohttp's ClientSession to a canonical-protocol provider, the standard library's json.
Usage: python bench/obvious.py PORT REDIS_URL PROVIDER_URL
"""

import json
import sys
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as redis
from aiohttp import ClientSession, web

STORE, PROVIDER = web.AppKey("store", redis.Redis), web.AppKey("provider", ClientSession)
FIELDS: dict[str, type | tuple[type, ...]] = {
    "TransactionID": str,
    "Amount": (int, float),
    "Currency": str,
    "ProviderKey": str,
}


async def pay(request: web.Request) -> web.Response:
    payment = await request.json()
    if bad := [name for name, kind in FIELDS.items() if not isinstance(payment.get(name), kind)]:
        return web.json_response({"error": "invalid_request", "fields": bad}, status=400)
    key, provider = f"obvious:{payment['TransactionID']}", payment["ProviderKey"].upper()
    store = request.app[STORE]
    if not await store.set(key, "", nx=True, ex=30):
        stored = await store.get(key)
        if stored:
            return web.Response(body=stored, content_type="application/json")
        return web.json_response({"error": "request_in_progress"}, status=409)
    reference = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{provider}/{payment['TransactionID']}"))
    body = {
        "reference": reference,
        "transaction_id": payment["TransactionID"],
        "amount": payment["Amount"],
        "currency": payment["Currency"],
        "payer": payment.get("Payer"),
    }
    async with request.app[PROVIDER].post(
        sys.argv[3], json=body, headers={"X-Reference-Id": reference}
    ) as upstream:
        answer = await upstream.json()
    if upstream.status != 200 or answer.get("status") != "SUCCESS":
        await store.delete(key)
        return web.json_response(
            {"status": "PROVIDER_ERROR", "error": "provider_error"}, status=502
        )
    result = json.dumps(
        {
            "status": "SUCCESS",
            "transaction_id": payment["TransactionID"],
            "provider": provider,
            "provider_reference": answer.get("provider_reference", reference),
            "amount": payment["Amount"],
            "currency": payment["Currency"],
        }
    )
    await store.set(key, result, ex=86400)
    return web.Response(text=result, content_type="application/json")


async def clients(app: web.Application) -> AsyncIterator[None]:
    app[STORE], app[PROVIDER] = redis.from_url(sys.argv[2]), ClientSession()
    yield
    await app[PROVIDER].close()
    await app[STORE].aclose()


if __name__ == "__main__":
    app = web.Application()
    app.cleanup_ctx.append(clients)
    app.router.add_post("/v1/pay", pay)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
