"""A one-line progress display with rows/s, shown only on an interactive terminal."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """``start(total)``, ``advance(rows)``, ``done()``; redraws at most ten times a second."""

    def __init__(self, stream=None, label: str = "replay"):
        self.stream = stream or sys.stderr
        self.label = label
        self.total = 0
        self.rows = 0
        self.t0 = 0.0
        self.last = 0.0

    @classmethod
    def for_terminal(cls) -> Progress | None:
        """A Progress on stderr when it is a terminal and not CI; else None (quiet)."""
        if os.environ.get("CI") or not sys.stderr.isatty():
            return None
        return cls()

    def start(self, total: int) -> None:
        self.total = max(0, int(total))
        self.rows = 0
        self.t0 = self.last = time.perf_counter()

    def advance(self, rows: int) -> None:
        self.rows += int(rows)
        now = time.perf_counter()
        if now - self.last >= 0.1 or self.rows >= self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.rows / (now - self.t0) if now > self.t0 else 0.0
        frac = self.rows / self.total if self.total else 1.0
        bar = "#" * int(30 * frac)
        self.stream.write(
            f"\r{self.label} [{bar:<30}] {frac:6.1%}  {self.rows / 1e6:,.1f}/"
            f"{self.total / 1e6:,.1f} M rows  {rate / 1e6:,.1f} M rows/s"
        )
        self.stream.flush()

    def done(self) -> None:
        if self.total:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
