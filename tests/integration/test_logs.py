"""Logs that read well anywhere: a bar on a terminal, plain periodic lines elsewhere.

``examples/_progress.py`` serves ``examples/quickstart.py`` and the digits quality study; in
CI (stdout not a terminal) they must print ordinary lines, not carriage-return frames.
"""

from __future__ import annotations

import doctest
import io
import subprocess
import sys
from pathlib import Path

from examples import _progress
from examples._progress import PlainProgress, progress_bar

ROOT = Path(__file__).resolve().parents[2]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_doctests():
    assert doctest.testmod(_progress).failed == 0


def test_plain_lines_off_a_terminal_and_a_bar_on_one():
    assert isinstance(progress_bar(10, "step", stream=io.StringIO()), PlainProgress)
    bar = progress_bar(10, "step", stream=_Terminal())
    assert type(bar).__name__ == "tqdm"
    bar.close()


def test_lines_are_periodic_not_per_update():
    out, now = io.StringIO(), [0.0]
    bar = PlainProgress(1000, "step", every_seconds=5, stream=out, clock=lambda: now[0])
    for _ in range(1000):
        now[0] += 0.1  # 100 s in all: 20 periodic lines, not 1000
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert 19 <= len(lines) <= 21
    assert lines[-1].startswith("1000/1000 step (100%)")
    assert "\r" not in out.getvalue()


def test_quickstart_output_in_a_log_has_no_carriage_returns(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"),
                          "--epochs", "1"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stdout + run.stderr
    assert "/4 step" in run.stdout  # the final progress line (1,257 digits // 256 = 4 steps)
