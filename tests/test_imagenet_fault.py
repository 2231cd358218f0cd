"""A real fault, survived: ``pretrain.py`` under ``torchrun --max-restarts 1`` with 2 gloo ranks.

One rank is SIGKILLed mid-epoch (``MUSIC_EXAMPLE_FAULT``, read by the example, fires on the
job's first attempt only); torchrun restarts the group, every rank resumes from the last
checkpoint, and the final weights equal an uninterrupted run's bit for bit. A kill half-way
through writing a checkpoint leaves the previous checkpoint intact (``save_atomic``: temporary
file, fsync, ``os.replace``), and resume picks that one up, never the half-written file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "imagenet"
sys.path.insert(0, str(EXAMPLE))

from imagenet_common import CheckpointError, load_checkpoint  # noqa: E402

#: 24 images, global batch 8: 3 steps per epoch, 2 epochs; checkpoints at steps 3 and 6.
PIPELINE = ["--synthetic", "--synthetic-images", "24", "--synthetic-resolution", "40",
            "--arch", "resnet18", "--image-size", "32", "--projector", "512-480",
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--workers", "0",
            "--norm", "group", "--device", "cpu", "--log-every", "1", "--no-progress"]


def torchrun(out: Path, *extra: str, restarts: int, fault: str | None = None,
             ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MUSIC_EXAMPLE_FAULT", None)
    if fault:
        env["MUSIC_EXAMPLE_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         f"--max-restarts={restarts}", str(EXAMPLE / "pretrain.py"), *PIPELINE,
         "--output-dir", str(out), *extra],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoint.pt")["model"]


def assert_same_weights(got: Path, want: Path) -> None:
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    different = [k for k in b if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault") / "uninterrupted"
    done = torchrun(out, restarts=0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_killed_mid_epoch_restarts_resumes_and_matches(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    done = torchrun(out, restarts=1, fault="kill-at-step:1:5")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "injected fault: rank 1 after step 5" in log
    assert re.search(r"exitcode\s*:\s*-9|Signal 9|SIGKILL", log), log[-4000:]
    assert "resumed from" in log and "at step 3 (epoch 1, batch 0)" in log
    assert_same_weights(out, uninterrupted)
    print(f"\nrank 1 SIGKILLed after step 5; torchrun restarted the group; resumed at step 3; "
          f"final weights equal the uninterrupted run's ({len(weights(out))} tensors)")


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_during_checkpoint_save_never_leaves_a_half_file_for_resume(tmp_path,
                                                                          uninterrupted):
    out = tmp_path / "killed-in-save"
    # Checkpoints every 2 steps: at 2, 3 (epoch end), then rank 0 dies writing step 4's.
    done = torchrun(out, "--ckpt-every-steps", "2", restarts=0, fault="kill-in-save:4")
    assert done.returncode != 0, "the job should have died"
    assert "injected fault: in the middle of writing" in done.stderr
    partial = out / "checkpoint.pt.tmp"
    assert partial.exists() and partial.stat().st_size < (out / "checkpoint.pt").stat().st_size
    with pytest.raises(CheckpointError, match="checkpoint.pt.tmp"):
        load_checkpoint(partial)  # truly half-written
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3  # the previous one, intact
    # The same command again (no fault): resumes from step 3 and ends where the other did.
    again = torchrun(out, "--ckpt-every-steps", "2", restarts=0)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "at step 3 (epoch 1, batch 0)" in again.stderr
    assert_same_weights(out, uninterrupted)


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_during_save_under_torchrun_restart(tmp_path, uninterrupted):
    out = tmp_path / "killed-in-save-restarted"
    done = torchrun(out, "--ckpt-every-steps", "2", restarts=1, fault="kill-in-save:4")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "injected fault: in the middle of writing" in log
    assert "at step 3 (epoch 1, batch 0)" in log
    assert_same_weights(out, uninterrupted)
