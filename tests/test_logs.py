"""The JSON log lines: timestamps, the request line's fast path and the buffered sink."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Iterator

import pytest

from proxy.observability import logs


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1764093000.0004, "2025-11-25T17:50:00.000Z"),
        (1764093000.9999, "2025-11-25T17:50:00.999Z"),
        (1764093001.0005, "2025-11-25T17:50:01.000Z"),
        (1764093001.25, "2025-11-25T17:50:01.250Z"),
    ],
)
def test_timestamps_are_iso_8601_utc_with_milliseconds(created, expected):
    assert logs._timestamp(created) == expected


def test_a_cached_timestamp_is_never_served_for_another_millisecond():
    first = logs._timestamp(1764093000.1234)
    assert logs._timestamp(1764093000.1239) == first
    assert logs._timestamp(1764093000.1241) == "2025-11-25T17:50:00.124Z"
    assert logs._timestamp(1764093060.1241) == "2025-11-25T17:51:00.124Z"


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[logs.BufferedLineHandler, io.StringIO]]:
    stream = io.StringIO()
    handler = logs.BufferedLineHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    monkeypatch.setattr(logs, "_sink", handler)
    logger = logging.getLogger(logs.REQUEST_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler, stream
    logger.setLevel(level)


async def test_request_lines_are_buffered_then_written_in_order_as_json(sink):
    handler, stream = sink
    logs.log_request({"request_id": "r1", "status": 200, "provider": None})
    logs.log_request({"request_id": "r2", "status": 503, "latency_ms": 0.5})
    assert stream.getvalue() == ""  # waiting for the flush timer, not written per line
    handler.flush()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["request_id"] == "r1"
    assert first["provider"] is None
    assert first["level"] == "info"
    assert first["logger"] == logs.REQUEST_LOGGER
    assert first["msg"] == "request"
    assert first["ts"].endswith("Z")
    assert second == {**second, "request_id": "r2", "status": 503, "latency_ms": 0.5}


async def test_the_flush_timer_writes_buffered_lines_without_help(sink):
    _, stream = sink
    logs.log_request({"request_id": "r1"})
    for _ in range(200):  # polls for the 20 ms timer, at most two seconds
        if stream.getvalue():
            break
        await asyncio.sleep(0.01)
    assert json.loads(stream.getvalue())["request_id"] == "r1"


async def test_a_warning_writes_the_lines_before_it_at_once_and_in_order(sink):
    handler, stream = sink
    logs.log_request({"request_id": "r1"})
    record = logging.LogRecord("payagg", logging.WARNING, __file__, 1, "breaker open", None, None)
    handler.emit(record)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("request_id", line["msg"]) for line in lines] == ["r1", "breaker open"]


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging as `payagg serve` calls it; the process's logging restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_sink", None)
    yield
    logs._process_fields.clear()
    root.handlers[:] = handlers
    root.setLevel(level)


def formatted() -> str:
    record = logging.LogRecord("payagg", logging.INFO, __file__, 1, "hello", None, None)
    return logs.JsonFormatter().format(record)


def test_log_lines_are_compact_json_like_the_request_line(configured):
    logs.configure_logging()
    line = formatted()
    assert ", " not in line
    assert '"level":"info"' in line
    assert "worker" not in json.loads(line)


def test_under_workers_every_line_names_its_worker(configured, capsys):
    logs.configure_logging(worker=True)
    logging.getLogger("payagg").warning("a warning")
    logs.log_request({"status": 200})
    assert logs._sink is not None
    logs._sink.flush()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["worker"] for line in lines] == [os.getpid(), os.getpid()]
