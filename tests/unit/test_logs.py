"""Log lines keep the ids a call passes as `extra`, as text and as JSON."""

from __future__ import annotations

import logging

import orjson

from service.logs import JsonFormatter, TextFormatter


def _record(message: str, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("service.sync.worker")
    return logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, message, None, None, extra=extra
    )


def test_text_lines_end_with_the_context_as_key_value_pairs() -> None:
    line = TextFormatter().format(
        _record("delivery failed", destination="ehr-1", status=503, error="GET /x answered 503")
    )
    assert line.endswith(
        " WARNING service.sync.worker delivery failed destination=ehr-1 status=503 "
        'error="GET /x answered 503"'
    )


def test_a_line_without_context_is_the_plain_message() -> None:
    assert (
        TextFormatter()
        .format(_record("worker started"))
        .endswith("WARNING service.sync.worker worker started")
    )


def test_json_lines_are_one_object_with_the_context() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = _record("lane delivery failed", destination="ehr-1", strategies={"A": "b"})
        record.exc_info = sys.exc_info()
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "service.sync.worker"
    assert entry["message"] == "lane delivery failed"
    assert entry["destination"] == "ehr-1"
    assert entry["strategies"] == {"A": "b"}
    assert "RuntimeError: boom" in entry["exception"]
    assert entry["time"].endswith("+00:00")
