"""`payagg demo`: the original service's validation run, n payments in a row, then a summary."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

DEFAULT_PROXY_URL = "http://127.0.0.1:8080"
# The answers that come from the provider itself, as opposed to the breaker's fast 503.
PROVIDER_ANSWERS = {200, 402, 502, 504}
REQUEST_TIMEOUT_S = 30.0
COLOURS = {200: "32", 402: "33"}  # green, yellow; every 5xx is red ("31")
# A client's API key for a proxy that runs `auth: required` (the local stack runs `auth: off`).
API_KEY_ENV = "PAYAGG_API_KEY"


@dataclass(frozen=True)
class ProxyReply:
    status: int
    error: str  # the body's `error` code ("" for 200/402 or an unreadable body)
    detail: str  # what to show next to the status
    latency_ms: float

    @property
    def breaker_open(self) -> bool:
        return self.status == 503 and self.error == "provider_unavailable"


def proxy_url(text: str) -> str:
    """`--url` as given, if it is an http(s) URL with a host; raises ValueError saying why not."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"needs a scheme and a host, like http://{text.split('//')[-1]}")
    return text


class StackUnreachable(Exception):
    """The proxy did not answer at all (refused, unknown host, timed out)."""


def run_demo(url: str, provider: str, count: int, out: TextIO = sys.stdout) -> int:
    base = url.rstrip("/")
    run_id = time.strftime("%Y%m%d%H%M%S") + f"{int(time.time() * 1000) % 1000:03d}"
    colour = out.isatty()
    answers: list[ProxyReply] = []
    print(f"{count} payments to {provider} through {base}/v1/pay", file=out, flush=True)
    for number in range(1, count + 1):
        try:
            answer = pay(base, f"DEMO-{run_id}-{number}", provider)
        except StackUnreachable as problem:
            print(
                f"payagg demo: cannot reach {base} ({problem}): "
                "is the stack running? try `make dev`",
                file=sys.stderr,
            )
            return 1
        answers.append(answer)
        print(f"{paint(answer.status, colour)}  {answer.detail}", file=out, flush=True)
    print_summary(answers, out)
    return 0


def pay(base: str, transaction_id: str, provider: str) -> ProxyReply:
    payment = {
        "TransactionID": transaction_id,
        "Amount": 20.00,
        "Currency": "ZAR",
        "ProviderKey": provider,
    }
    request = urllib.request.Request(
        f"{base}/v1/pay",
        data=json.dumps(payment).encode(),
        headers={"Content-Type": "application/json", **_authorization()},
        method="POST",
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except urllib.error.URLError as error:
        raise StackUnreachable(reason_text(error.reason)) from error
    except (ConnectionError, TimeoutError) as error:
        raise StackUnreachable(reason_text(error)) from error
    latency_ms = (time.perf_counter() - started) * 1000
    try:
        document = json.loads(raw)
    except ValueError:
        document = {}
    if not isinstance(document, dict):
        document = {}
    error_code = str(document.get("error") or "")
    detail = str(document.get("status") or error_code or "")
    reason = document.get("reason")
    if reason:
        detail += f" ({reason})"
    return ProxyReply(status, error_code, f"{detail:<34} {latency_ms:7.1f} ms", latency_ms)


def _authorization() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def reason_text(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def paint(status: int, colour: bool) -> str:
    if not colour:
        return str(status)
    code = COLOURS.get(status, "31" if status >= 500 else "")
    return f"\033[{code}m{status}\033[0m" if code else str(status)


def print_summary(answers: list[ProxyReply], out: TextIO) -> None:
    counts = Counter(answer.status for answer in answers)
    print("\nsummary", file=out)
    print(
        "  statuses: " + ", ".join(f"{status} x{counts[status]}" for status in sorted(counts)),
        file=out,
    )
    opened = next((i for i, answer in enumerate(answers, 1) if answer.breaker_open), None)
    if opened is None:
        print("  breaker: stayed closed (no 503 provider_unavailable)", file=out)
    else:
        print(f"  breaker: opened at request {opened} (first 503 provider_unavailable)", file=out)
    fast = [answer.latency_ms for answer in answers if answer.status == 503]
    provider = [answer.latency_ms for answer in answers if answer.status in PROVIDER_ANSWERS]
    print(
        f"  median latency: 503s {median_text(fast)}, "
        f"provider answers (200/402/502/504) {median_text(provider)}",
        file=out,
        flush=True,
    )


def median_text(latencies_ms: list[float]) -> str:
    if not latencies_ms:
        return "n/a (none)"
    return f"{statistics.median(latencies_ms):.1f} ms (n={len(latencies_ms)})"
