"""Identifiers unique across processes, made without a system call each."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable


def unique_tokens() -> Callable[[], str]:
    """A maker of 32-hex-digit tokens: a random per-process prefix and a counter.

    Unique across processes and restarts like uuid4, but without a getrandom() system call per
    token (uuid4 was a tenth of a replay's CPU time).
    """
    prefix = secrets.token_hex(8)
    numbers = itertools.count(1)

    def next_token() -> str:
        return f"{prefix}{next(numbers):016x}"

    return next_token
