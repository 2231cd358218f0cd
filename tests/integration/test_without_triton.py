"""The package imports and computes on a machine without Triton (and without a GPU).

A fresh interpreter with ``triton`` made unimportable (as on macOS, Windows, or a minimal
Linux install) imports ``music_loss``, trains a step on the CPU with ``backend="auto"``
(which must pick the ``torch`` backend), and gets a clear error for ``backend="triton"``.
``.ci/run`` also installs the built wheel into a throwaway venv with a CPU-only torch and no
Triton at all, and runs the same script.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SMOKE = Path(__file__).with_name("smoke_without_triton.py")


def test_imports_and_trains_with_triton_hidden():
    run = subprocess.run([sys.executable, str(SMOKE), "--hide-triton"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "triton importable: False" in run.stdout
    assert "backend auto -> torch" in run.stdout
