"""Where a py-spy raw profile of payagg spent its time: `python bench/profile_summary.py FILE`.

Each sample is charged to the innermost frame that says who is working:
  system calls   the C library's socket, poll and process calls (write, read, epoll, getpid, ...)
  payagg         code under proxy/, and what it calls directly (JSON, hashing, Decimal, regex)
  valkey-glide   the Redis client's Python layer (its FFI calls, futures, answer pipe); its Rust
                 core runs on threads of its own, which py-spy does not sample
  aiohttp        aiohttp's server and client and their helpers (multidict, yarl, propcache)
  event loop     uvloop/libuv and asyncio's task machinery
  other          everything else (the interpreter itself, the garbage collector)
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_SYSTEM_CALLS = re.compile(
    r"^(write|writev|read|readv|recv\w*|send\w*|epoll_\w+|getpid|getrandom|clock_gettime|"
    r"__libc_\w+|syscall) \(libc"
)
_OWNERS = [
    ("valkey-glide", re.compile(r"\((glide|glide_shared|cffi|sniffio)/|libglide_ffi|_cffi_back")),
    ("aiohttp", re.compile(r"\((aiohttp|multidict|yarl|propcache)/|_http_parser|_multidict")),
    ("event loop", re.compile(r"\(loop\.c|\(uvloop/|\w+\.c\) *$|asyncio/")),
]
_LIBRARY_LEAF = re.compile(r"\((json|orjson|hashlib|_hashlib|decimal|_decimal|re|_sre|sre)")


def owner(stack: list[str]) -> str:
    leaf = stack[-1]
    if _SYSTEM_CALLS.match(leaf):
        return "system calls"
    for frame in reversed(stack):
        if "(proxy/" in frame:
            return "payagg"
        if _LIBRARY_LEAF.search(frame):
            continue  # a library call is charged to whoever made it
        for name, pattern in _OWNERS:
            if pattern.search(frame):
                return name
    return "other"


def summarise(path: Path) -> str:
    shares: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            shares[owner(stack.split(";"))] += int(count)
    total = sum(shares.values()) or 1
    return "\n".join(
        f"  {name:13} {shares[name] / total:6.1%}"
        for name in ("system calls", "payagg", "valkey-glide", "aiohttp", "event loop", "other")
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(summarise(Path(sys.argv[1])))
