"""A one-line progress bar on stderr for long commands (``carousel import``): done/total, rate, ETA.

Small on purpose (carousel's base install has no tqdm): it redraws at most ``interval_s`` apart,
draws nothing when its stream is not a terminal (a log file or a pipe gets no ``\\r`` noise) or
when told to be quiet, and ends its line on :meth:`ProgressBar.close`.

>>> import io
>>> bar = ProgressBar(100, stream=io.StringIO())   # not a TTY: silent
>>> bar.update(40); bar.close(); bar.stream.getvalue()
''
>>> out = io.StringIO()
>>> bar = ProgressBar(100, "import", stream=out, enabled=True, interval_s=0)
>>> bar.update(50); "import" in out.getvalue() and " 50/100" in out.getvalue()
True
>>> format_duration(3725)
'1:02:05'
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS`` under an hour); ``--:--`` for an unknown or endless duration."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """Progress of ``total`` units on ``stream`` (stderr by default).

    ``enabled`` defaults to whether the stream is a terminal. ``start`` counts units done before
    (a resumed job): they fill the bar but not the rate, which measures this run only.
    """

    def __init__(self, total: int, label: str = "", *, start: int = 0, stream: TextIO | None = None,
                 enabled: bool | None = None, interval_s: float = 0.1, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled, self.total, self.label = enabled, max(0, total), label
        self.start = self.done = start
        self.interval_s, self.width = interval_s, width
        self._t0 = time.monotonic()
        self._last = float("-inf")
        self._drawn = False

    @property
    def rate(self) -> float:
        """Units per second in this run."""
        elapsed = time.monotonic() - self._t0
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, done: int) -> None:
        """Set the units done so far (not an increment) and redraw when due."""
        self.done = done
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval_s or done >= self.total):
            self._last = now
            self._draw()

    def _draw(self) -> None:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        full = int(frac * self.width)
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        digits = len(str(self.total))
        line = (f"{self.label + ' ' if self.label else ''}[{'#' * full}{'.' * (self.width - full)}] "
                f"{self.done:>{digits}}/{self.total} {100 * frac:5.1f}% {rate:,.0f}/s ETA {format_duration(eta)}")
        self.stream.write("\r" + line + "\x1b[K")  # erase what a longer earlier line left
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Draw the final state and end the line (only if anything was drawn)."""
        if self.enabled and self._drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
