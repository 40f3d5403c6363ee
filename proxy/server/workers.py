"""`payagg serve --workers N`: N proxy processes on one port (SO_REUSEPORT), metrics merged.

Each worker is a full `payagg serve` with its own breakers, Redis connection and provider
pools; the kernel spreads connections across them. prometheus-client's multiprocess mode merges
their metrics: any worker's `/metrics` shows the sums (the breaker state gauge then counts the
workers in each state). The parent only supervises: SIGTERM or SIGINT is passed on to every
worker, which drains as a single process does, and so is SIGHUP (each worker reloads its config
file); a worker that dies on its own stops the others and the parent exits non-zero, so the
orchestrator (ECS) replaces the whole task. Every worker also listens on the admin port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import FrameType

from prometheus_client import multiprocess

from proxy.server.children import stop_with_parent

log = logging.getLogger("payagg.workers")

WORKER_ENV = "PAYAGG_WORKER"


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def run_workers(count: int, serve_args: Sequence[str], shutdown_timeout_s: float) -> int:
    """Start `count` workers with `payagg serve <serve_args>` and supervise them."""
    metrics_dir = tempfile.mkdtemp(prefix="payagg-metrics-")
    env = {**os.environ, WORKER_ENV: "1", "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    argv = [sys.executable, "-m", "proxy", "serve", *serve_args]
    workers: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers.values():
            # os.kill, not Popen.poll()/send_signal(): those reap a worker that already died,
            # and os.wait() below would then wait for a child that is gone (ChildProcessError).
            # A worker still in `workers` is not reaped yet, so its pid cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)

    def reload(signum: int, frame: FrameType | None) -> None:
        for worker in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGHUP)

    # Handlers first: a SIGTERM that arrives while workers start still reaches every one.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for _ in range(count):
        if stopping:
            break
        started = subprocess.Popen(argv, env=env, preexec_fn=_worker_setup())
        workers[started.pid] = started
    log.info("started %d workers: %s", count, " ".join(str(pid) for pid in workers))
    failed = False
    try:
        while workers:
            pid, status = os.wait()
            if workers.pop(pid, None) is None:
                continue
            multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
            code = os.waitstatus_to_exitcode(status)
            if not stopping:
                failed = True
                log.error("worker %d exited with %d; stopping the others", pid, code)
                stop(signal.SIGTERM, None)
            elif code != 0:
                failed = True
        return 1 if failed else 0
    finally:
        _kill_stragglers(list(workers.values()), shutdown_timeout_s)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker_setup() -> Callable[[], None]:
    """The worker stops with the parent, and ignores SIGHUP until its event loop handles it
    (an ignored signal stays ignored across exec): a reload during start-up cannot kill it."""
    with_parent = stop_with_parent()

    def preexec() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with_parent()

    return preexec


def _kill_stragglers(workers: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for worker in workers:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
