"""aiohttp's ceiling, for `make bench`: the most one aiohttp process answers on this machine.

The same server layer and event loop as payagg (aiohttp's low-level web.Server on uvloop) answering
one constant JSON body with no work at all: what payagg's fail-fast and replay paths are held to.
Usage: python bench/ceiling.py PORT
"""

import asyncio
import signal
import sys

import uvloop
from aiohttp import web

BODY = (
    b'{"status":"SUCCESS","transaction_id":"ceiling","provider":"FAST",'
    b'"provider_reference":"ceiling","amount":20.0,"currency":"ZAR"}'
)


async def answer(request: web.BaseRequest) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def serve(port: int) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    runner = web.ServerRunner(web.Server(answer), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
