"""JSON logs with a request id carried through a context variable."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import ClassVar

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed with ``extra=`` are kept."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            payload["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class ConsoleFormatter(logging.Formatter):
    """Plain lines for people (``loraplex up``); the level is coloured on a terminal."""

    _COLOURS: ClassVar[dict[str, str]] = {
        "DEBUG": "2",
        "INFO": "32",
        "WARNING": "33",
        "ERROR": "31",
        "CRITICAL": "1;31",
    }

    def __init__(self, colour: bool) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        code = self._COLOURS.get(record.levelname)
        if not self._colour or code is None:
            return line
        return line.replace(record.levelname, f"\033[{code}m{record.levelname}\033[0m", 1)


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Route the root logger to stderr, as JSON unless a person asked for plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ConsoleFormatter(colour=sys.stderr.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
