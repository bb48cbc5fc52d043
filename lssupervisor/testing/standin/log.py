"""logrus-compatible log lines on stderr (LS ``config/logger``).

``human`` (LS default) and ``logfmt`` are logrus' TextFormatter without a TTY:
``time="2006-01-02T15:04:05+01:00" level=info msg="..." key=val`` (keys after msg sorted); ``human``
also prefixes the message with ``[<db, padded to 14>] `` when a ``db`` field is present.
``json`` is logrus' JSONFormatter (keys sorted). A write error on stderr is ignored.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

_LEVELS = {"trace": 6, "debug": 5, "info": 4, "warning": 3, "warn": 3, "error": 2, "fatal": 1, "panic": 0}
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._/@^+")


def _rfc3339(t: float) -> str:
    lt = time.localtime(t)
    off = lt.tm_gmtoff or 0
    if off == 0:
        zone = "Z"
    else:
        sign = "+" if off > 0 else "-"
        off = abs(off)
        zone = f"{sign}{off // 3600:02d}:{off % 3600 // 60:02d}"
    return time.strftime("%Y-%m-%dT%H:%M:%S", lt) + zone


def _quote(v: Any) -> str:
    s = v if isinstance(v, str) else ("true" if v is True else "false" if v is False else str(v))
    if s and all(c in _SAFE for c in s):
        return s
    return json.dumps(s, ensure_ascii=False)


class Logger:
    def __init__(self) -> None:
        self.level = _LEVELS["info"]
        self.format = "human"
        self.timestamp = "short"
        self._lock = threading.Lock()

    def configure(self, level: str, fmt: str, timestamp: str) -> None:
        self.level = _LEVELS.get(level.lower(), self.level)
        self.format = fmt or "human"
        self.timestamp = timestamp

    def enabled(self, level: str) -> bool:
        return _LEVELS[level] <= self.level

    def log(self, level: str, msg: str, **fields: Any) -> None:
        if not self.enabled(level):
            return
        name = "warning" if level == "warn" else level
        now = time.time()
        no_ts = self.timestamp == "disable"
        if self.format == "json":
            data: dict[str, Any] = dict(fields)
            data["level"] = name
            data["msg"] = msg
            if not no_ts:
                data["time"] = _rfc3339(now)
            line = json.dumps(dict(sorted(data.items())), default=str, ensure_ascii=False)
        else:
            if self.format == "human" and "db" in fields:
                msg = f"[{fields['db']:<14}] {msg}"
            parts = []
            if not no_ts:
                parts.append(f'time="{_rfc3339(now)}"')
            parts.append(f"level={name}")
            if msg:
                parts.append(f"msg={_quote(msg)}")
            parts.extend(f"{k}={_quote(fields[k])}" for k in sorted(fields))
            line = " ".join(parts)
        with self._lock:
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def debug(self, msg: str, **f: Any) -> None:
        self.log("debug", msg, **f)

    def info(self, msg: str, **f: Any) -> None:
        self.log("info", msg, **f)

    def warn(self, msg: str, **f: Any) -> None:
        self.log("warning", msg, **f)

    def error(self, msg: str, **f: Any) -> None:
        self.log("error", msg, **f)

    def fatal(self, msg: str, **f: Any) -> None:
        """logrus.Fatal: log, then exit 1 at once (no deferred cleanup, like os.Exit)."""
        self.log("fatal", msg, **f)
        os._exit(1)


log = Logger()
