"""A one-line progress display for long work on a terminal (and silence elsewhere)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from indexer.progress import Progress


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class TerminalProgress:
    """Redraws one status line at most 10 times a second: phase, bytes, rate, bar."""

    WIDTH = 24

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.label = ""
        self.total: int | None = None
        self.done = 0
        self.started = self.phase_start = time.monotonic()
        self.last_draw = 0.0
        self.drawn = False

    def phase(self, label: str, total: int | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.phase_start = time.monotonic()
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        elapsed = max(now - self.phase_start, 1e-6)
        rate = f"{human_bytes(self.done / elapsed)}/s" if self.done else ""
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * self.WIDTH)
            bar = "[" + "#" * filled + "-" * (self.WIDTH - filled) + f"] {frac:4.0%} "
            amount = f"{human_bytes(self.done)}/{human_bytes(self.total)}"
        else:
            bar = ""
            amount = human_bytes(self.done) if self.done else ""
        line = f"{self.label:<34.34} {bar}{amount} {rate}".rstrip()
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def progress_for(quiet: bool, stream: TextIO | None = None) -> "Progress":
    """A terminal bar when ``stream`` (default stderr) is a TTY and not quiet; otherwise nothing."""
    from indexer.progress import NullProgress

    stream = stream or sys.stderr
    if quiet or not stream.isatty():
        return NullProgress()
    return TerminalProgress(stream)
