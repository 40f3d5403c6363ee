"""JSON answers: compact (no spaces after `,` and `:`), `Content-Type: application/json`.

Every JSON body payagg writes looks the same: the stored payment answers, the error bodies and
the endpoints that build theirs on the spot (aiohttp's `json_response` would add spaces and a
charset parameter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

JSON = "application/json"


def json_answer(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`body` as compact JSON (orjson: UTF-8, no spaces), with `headers` added."""
    return web.Response(
        body=orjson.dumps(body), status=status, headers={**(headers or {}), "Content-Type": JSON}
    )
