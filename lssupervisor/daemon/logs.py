"""Logging set-up: stable, greppable lines, or JSON objects with ``--log-format json``.

Text (logfmt)::

    time=2025-01-02T03:04:05.678Z level=info msg="state RUNNING -> STOPPING" reason=shutdown pid=123

JSON (one object per line)::

    {"time": "2025-01-02T03:04:05.678Z", "level": "info", "msg": "state RUNNING -> STOPPING",
     "reason": "shutdown", "pid": 123}

Structured fields travel as ``extra={"fields": {...}}`` (see :func:`fields`) and keep their order;
values are quoted in text only when they need it (spaces, ``=``, quotes, empty). Times are UTC. A
traceback (bugs only) becomes one ``exc=`` field, so a line is always one line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import IO, Any

from lssupervisor.config import LogFormat

_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error", "CRITICAL": "critical"}


def fields(**values: Any) -> dict[str, Any]:
    """``log.info("msg", extra=fields(pid=1, reason="x"))``."""
    return {"fields": values}


def _time(record: logging.LogRecord) -> str:
    t = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _record_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    extra = getattr(record, "fields", None)
    return extra if isinstance(extra, Mapping) else {}


def logfmt_value(value: Any) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    if text and not any(c in text for c in ' ="\\\n\r\t'):
        return text
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"time={_time(record)}",
            f"level={_LEVELS.get(record.levelname, record.levelname.lower())}",
            f"msg={logfmt_value(record.getMessage())}",
        ]
        if not record.name.startswith("lssupervisor") or record.levelno >= logging.WARNING:
            # Which part of the program spoke, where it helps: foreign libraries and problems.
            parts.append(f"logger={logfmt_value(record.name)}")
        parts.extend(f"{k}={logfmt_value(v)}" for k, v in _record_fields(record).items())
        if record.exc_info:
            parts.append(f"exc={logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _time(record),
            "level": _LEVELS.get(record.levelname, record.levelname.lower()),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        for k, v in _record_fields(record).items():
            doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(fmt: LogFormat | str, level: str = "info", stream: IO[str] | None = None) -> None:
    """Send every log record to ``stream`` (default stderr: journald and containers collect it) in
    ``fmt``. Replaces the root logger's handlers, so calling it again (tests) does not duplicate."""
    fmt = LogFormat(fmt) if isinstance(fmt, str) else fmt
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
