"""Log lines that carry their context: the ids a record's `extra` holds, as text or JSON.

`logging`'s own formatters drop what a call passes as `extra` (`destination`, `resource`,
`status` ...), which is what an operator greps for. Both formats here keep it: `text` appends
`key=value` pairs to the message, `json` writes one object per line for a log shipper. Callers
put ids in `extra`, never patient data.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Final

import orjson

_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
"""The attributes every LogRecord has: anything else came from `extra`."""


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """What the call passed as `extra`, in the order it gave it."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message key=value ...` (values JSON-encoded when not plain)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [f"{key}={_text(value)}" for key, value in context_of(record).items()]
        if not pairs:
            return line
        head, newline, trace = line.partition("\n")  # a traceback stays below the line
        return f"{head} {' '.join(pairs)}{newline}{trace}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in context_of(record).items() if k not in entry}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _text(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return orjson.dumps(value, default=str).decode()


def configure_logging(level: str, log_format: str) -> None:
    """The root logger's level and format (`text` or `json`), for every entry point."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a host's own configuration stands
        root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every URL it calls at INFO (JWK Sets, EHR resources by id): not in our logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
