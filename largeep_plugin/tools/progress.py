"""A tiny text progress bar for the command line (no dependency).

    bar = ProgressBar(total=200, label="train")
    for step in range(200):
        ...
        bar.update(step + 1, loss=2.31, tok_s=5120)
    bar.close()

On a terminal the bar redraws one line in place; when the stream is a file or a pipe it prints a full line about
every tenth of the run instead (so logs stay readable).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def format_value(value: object) -> str:
    """Short display of a number: thousands separators for large values, 3 significant decimals for small."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}"


class ProgressBar:
    """Progress of ``total`` steps on ``stream`` (stderr by default).

    Args:
        total: number of steps (>= 1).
        label: text before the bar.
        width: characters of the bar itself.
        stream: where to write; None means ``sys.stderr``.
        min_interval: seconds between redraws on a terminal (the last step is always drawn).
    """

    def __init__(self, total: int, *, label: str = "", width: int = 30, stream: TextIO | None = None,
                 min_interval: float = 0.1):
        if total < 1:
            raise ValueError(f"total={total} must be >= 1")
        self.total = total
        self.label = label
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self._drawn = False

    def render(self, step: int, **fields: object) -> str:
        """The line for ``step`` done out of ``total`` with ``name value`` fields."""
        step = max(0, min(step, self.total))
        filled = round(self.width * step / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self._start
        parts = [f"{self.label} " if self.label else "", f"[{bar}] {step}/{self.total}"]
        parts += [f"  {name} {format_value(value)}" for name, value in fields.items()]
        parts.append(f"  {elapsed:.0f}s")
        return "".join(parts)

    def update(self, step: int, **fields: object) -> None:
        """Show that ``step`` steps are done."""
        now = time.monotonic()
        last = step >= self.total
        if self.interactive:
            if not last and now - self._last_draw < self.min_interval:
                return
            self.stream.write("\r" + self.render(step, **fields) + "\x1b[K")
        else:
            decile = (10 * step) // self.total
            if decile == self._last_decile and not last:
                return
            self._last_decile = decile
            self.stream.write(self.render(step, **fields) + "\n")
        self.stream.flush()
        self._last_draw = now
        self._drawn = True

    def close(self) -> None:
        """End the in-place line (on a terminal)."""
        if self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False
