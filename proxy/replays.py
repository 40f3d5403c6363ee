"""Completed payments this process has seen, replayed without a Redis round trip.

A completed key never changes in Redis until it expires (only the lock's owner may write it,
and a completed key has no owner), so a copy is exact for as long as Redis keeps the original.
Each copy expires with the original's remaining TTL, read from Redis with it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class ReplayCache(Generic[Value]):
    """A bounded LRU of completed keys, each with a monotonic deadline."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Value]] = OrderedDict()

    def get(self, key: bytes) -> Value | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        deadline, value = entry
        if self._clock() >= deadline:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: Value, ttl_s: float) -> None:
        if self._capacity <= 0 or ttl_s <= 0:
            return
        self._entries[key] = (self._clock() + ttl_s, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
