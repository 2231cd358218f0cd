"""Progress that reads well anywhere: a tqdm bar on a terminal, plain periodic lines elsewhere.

A tqdm bar redraws itself with carriage returns; in a CI log or a file every redraw is kept,
thousands of frames per run. When the stream is not a terminal (or tqdm is not installed),
:func:`progress_bar` returns :class:`PlainProgress` instead, which prints one ordinary line
every ``every_seconds`` and one at the end.

Used by ``examples/quickstart.py`` and ``benchmarks/quality/study.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class PlainProgress:
    """The part of tqdm's interface the examples use, printed as periodic plain lines.

    Args:
        total: Number of units in the loop.
        unit: Name of one unit ("step", "epoch").
        desc: Prefix of every line.
        every_seconds: Least time between two lines (the last line is always printed).
        stream: Where lines go (``sys.stdout`` when ``None``).
        clock: Seconds since an arbitrary origin (``time.monotonic``; tests pass a fake).

    Example:
        >>> import io
        >>> out, now = io.StringIO(), [0.0]
        >>> bar = PlainProgress(4, "step", every_seconds=10, stream=out, clock=lambda: now[0])
        >>> for _ in range(4):
        ...     now[0] += 6.0
        ...     bar.update()
        ...     bar.set_postfix(loss="1.0")
        >>> bar.close()
        >>> print(out.getvalue(), end="")
        2/4 step (50%), 12 s, ~12 s left, loss=1.0
        4/4 step (100%), 24 s, loss=1.0
    """

    def __init__(self, total: int, unit: str = "it", desc: str = "", every_seconds: float = 30.0,
                 stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.unit, self.desc = total, unit, desc
        self.every_seconds = every_seconds
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.count = self.reported = 0
        self.postfix = ""
        self.start = self.last_line = clock()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.clock() - self.last_line >= self.every_seconds:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed and self.count != self.reported:  # the final count, once
            self._line()
        self.closed = True

    def _line(self) -> None:
        now = self.clock()
        elapsed = now - self.start
        parts = [f"{self.desc}: " if self.desc else "",
                 f"{self.count}/{self.total} {self.unit}"]
        if self.total:
            parts.append(f" ({100 * self.count / self.total:.0f}%)")
        parts.append(f", {elapsed:.0f} s")
        if 0 < self.count < self.total:
            parts.append(f", ~{elapsed * (self.total - self.count) / self.count:.0f} s left")
        if self.postfix:
            parts.append(f", {self.postfix}")
        print("".join(parts), file=self.stream, flush=True)
        self.last_line, self.reported = now, self.count


def progress_bar(total: int, unit: str = "it", desc: str = "", *, every_seconds: float = 30.0,
                 stream: TextIO | None = None) -> Any:
    """A tqdm bar when ``stream`` is a terminal and tqdm imports, else :class:`PlainProgress`.

    Both offer ``update``, ``set_postfix``, ``set_postfix_str``, ``set_description``,
    ``write`` and ``close``.
    """
    stream = stream if stream is not None else sys.stdout
    if stream.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, unit=unit, desc=desc or None, file=stream,
                        dynamic_ncols=True)
    return PlainProgress(total, unit, desc, every_seconds=every_seconds, stream=stream)
