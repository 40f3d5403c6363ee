"""One JSON object per log line, so log pipelines (CloudWatch, Loki) can query every field."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import orjson

REQUEST_LOGGER = "payagg.request"
_request_log = logging.getLogger(REQUEST_LOGGER)
_millisecond = -1
_millisecond_text = ""


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds; built once per millisecond, not once per line."""
    global _millisecond, _millisecond_text
    millisecond = int(created * 1000)
    if millisecond != _millisecond:
        second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millisecond // 1000))
        _millisecond, _millisecond_text = millisecond, f"{second}.{millisecond % 1000:03d}Z"
    return _millisecond_text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_process_fields)
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Compact like the request line and every JSON body payagg writes.
        return orjson.dumps(entry, default=str).decode()


class BufferedLineHandler(logging.Handler):
    """Collects lines and writes them together, like nginx's `access_log ... flush=`.

    A write per line is a system call per request, a tenth of a payment's CPU time. Lines wait
    at most FLUSH_INTERVAL_S (or until MAX_PENDING lines); warnings and errors are written at
    once, with everything before them, so the order of lines is kept. Without a running event
    loop (start-up, shutdown) every line is written at once.
    """

    FLUSH_INTERVAL_S = 0.02
    MAX_PENDING = 512

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record), urgent=record.levelno >= logging.WARNING)
        except Exception:
            self.handleError(record)

    def write_line(self, line: str, urgent: bool = False) -> None:
        self._pending.append(line)
        if urgent or len(self._pending) >= self.MAX_PENDING:
            self.flush()
        elif len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_INTERVAL_S, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()

    def close(self) -> None:
        self.flush()
        super().close()


_sink: BufferedLineHandler | None = None
# Fields every line carries: under `payagg serve --workers N`, which worker wrote it.
_process_fields: dict[str, Any] = {}


def log_request(fields: dict[str, Any]) -> None:
    """The one line per request, the hottest log line: written without a LogRecord.

    Building a LogRecord and running it through the logging machinery costs several times
    the line itself; the line goes to the same buffer, so the order of all lines is kept.
    """
    if not _request_log.isEnabledFor(logging.INFO):
        return
    if _sink is None:  # logging not configured by `payagg serve` (an embedding app, tests)
        _request_log.info("request", extra={"fields": fields})
        return
    entry = {"ts": _timestamp(time.time()), "level": "info", "logger": REQUEST_LOGGER}
    entry["msg"] = "request"
    entry.update(_process_fields)
    entry.update(fields)
    # orjson: a tenth of json.dumps's time on the line every request writes.
    _sink.write_line(orjson.dumps(entry).decode())


def log_level_problem(environ: Mapping[str, str]) -> str | None:
    """Why $LOG_LEVEL cannot be used (one line), or None when it is unset or a level name."""
    raw = environ.get("LOG_LEVEL", "")
    if not raw or raw.upper() in logging.getLevelNamesMapping():
        return None
    return f"LOG_LEVEL: must be one of debug, info, warning, error, critical, got {raw!r}"


def configure_logging(level: str | None = None, worker: bool = False) -> None:
    global _sink
    _process_fields.clear()
    if worker:
        _process_fields["worker"] = os.getpid()
    _sink = BufferedLineHandler(sys.stdout)
    _sink.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [_sink]
    root.setLevel((level or os.environ.get("LOG_LEVEL") or "INFO").upper())
    # aiohttp's access log would duplicate the gateway's own request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
