"""``examples/lightning/train.py`` as a user runs it: 2 DDP processes on the CPU.

The example builds ``MUSICLoss(gather_distributed=True)`` inside its ``LightningModule``
before Lightning starts the processes, trains on digits for 4 short epochs (36 steps) and
reports a linear probe before training and after each epoch. The run must finish on both
ranks, lower the loss, and leave the few-label probe better than at initialisation.

Needs the ``integrations`` extra (``pip install -e ".[integrations]"``); CI installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration._extras import require

require("pytorch_lightning")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning" / "train.py"


@pytest.mark.distributed
def test_lightning_ddp_example_trains_on_two_cpu_processes(tmp_path):
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "4", "--summary", str(summary_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2
    initial, *epochs = summary["epochs"]
    assert initial["step"] == 0 and len(epochs) == 4
    assert epochs[-1]["step"] == 4 * (1257 // (2 * 64))  # the global batch is 2 x 64 digits
    # Loss: from the first step's (about -3.2) well down (measured -4.78 after 36 steps).
    assert epochs[-1]["loss"] < summary["first_step_loss"] - 0.5
    # Few labels is where pretraining shows (measured 83.4 % at init, 85.3 % after).
    assert epochs[-1]["probe_5_per_class"] > initial["probe_5_per_class"]
    assert epochs[-1]["probe_all_labels"] > 0.9
