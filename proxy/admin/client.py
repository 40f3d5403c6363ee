"""What `payagg admin` sends: one admin API call, its answer, or a one-line reason it failed."""

from __future__ import annotations

import getpass
import json
import socket
import urllib.error
import urllib.request
from typing import Any

from proxy.admin.api import ACTOR_HEADER

DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"
_TIMEOUT_S = 30.0  # a reload counts pending payments in Redis first


class AdminCallFailed(Exception):
    """The call did not succeed; the message is one line, fit for stderr."""


def default_actor() -> str:
    """`user@host`: who acts, when --actor does not say."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "operator"
    return f"{user}@{socket.gethostname()}"[:64]


def call_admin(url: str, path: str, body: dict[str, Any], token: str, actor: str) -> str:
    """POST `body` to `url` + `path`; the answer's text on a 2xx, else AdminCallFailed."""
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token}",
            ACTOR_HEADER: actor,
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as error:
        raise AdminCallFailed(_describe_refusal(error.code, error.read())) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise AdminCallFailed(f"cannot reach the admin API at {url}: {reason}") from None


def _describe_refusal(status: int, raw: bytes) -> str:
    try:
        answer = json.loads(raw)
    except ValueError:
        return f"the admin API answered {status}"
    if not isinstance(answer, dict):
        return f"the admin API answered {status}"
    details = [answer.get("message", "")]
    if "fields" in answer:
        details += [f"{field} {problem}" for field, problem in answer["fields"].items()]
    details += answer.get("problems", [])
    return f"the admin API answered {status} {answer.get('error', '')}: " + "; ".join(
        str(detail) for detail in details if detail
    )
