"""The daemon's log: one JSON object per line on stderr, and a throttle for warnings that come in floods.

Every daemon module logs to the ``carousel.daemon`` logger; :func:`setup_logging` gives the
``carousel`` tree (the memories' loggers too) one JSON-lines handler at the profile's level.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from typing import Any

log = logging.getLogger("carousel.daemon")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` and any ``extra=`` fields."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).strip()
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    """JSON lines on stderr at ``level`` for every ``carousel`` logger (the daemon's and its memories')."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger("carousel")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class Throttled:
    """A warning for events that come in floods (a thousand idle connections timing out at once):
    at most one line per ``every_s``, saying how many were left out since the last; the metrics
    count every one."""

    def __init__(self, every_s: float) -> None:
        self._every, self._last, self._left_out = every_s, -math.inf, 0

    def warning(self, msg: str, extra: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._left_out += 1
            return
        log.warning(msg, extra={**extra, "not_logged_since_last": self._left_out})
        self._last, self._left_out = now, 0
