"""``examples/imagenet/check_parity.py`` can fail: injected errors make it exit non-zero.

A parity check only proves something if a wrong gradient, a crashing run or a missing leg
makes it fail. Each test runs the script on chosen legs with one injected error
(``--mutation``, see ``parity_mutations.py``) and asserts the exit code and the failing row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "imagenet"
sys.path.insert(0, str(EXAMPLE))


def check_parity(tmp_path: Path, *options: str,
                 env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    """Run check_parity.py with ``options``; return its exit code, JSON report and output.

    No ``--workdir``: the script's temporary folder (GBs of float64 checkpoints) is removed.
    """
    report = tmp_path / "parity.json"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "check_parity.py"), "--json", str(report), *options],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **(env or {})})
    results = json.loads(report.read_text()) if report.exists() else {}
    return done.returncode, results, done.stdout + done.stderr


def only_row(results: dict) -> dict:
    assert len(results["results"]) == 1, results
    return results["results"][0]


@pytest.mark.distributed
def test_one_percent_error_in_the_fused_path_fails(tmp_path):
    code, results, output = check_parity(tmp_path, "--legs", "triton", "--require-triton",
                                         "--mutation", "grad-x1.01")
    row = only_row(results)
    assert code == 1 and not results["ok"], output[-3000:]
    assert row["comparison"].startswith("triton (interpreter) vs reference")
    assert row["verdict"] == "FAIL" and row["update_rel_diff"] > 10 * row["update_tol"]


@pytest.mark.distributed
def test_one_percent_error_in_a_peer_on_two_ranks_fails(tmp_path):
    code, results, output = check_parity(tmp_path, "--legs", "ranks", "--losses",
                                         "barlow-twins", "--mutation", "grad-x1.01")
    row = only_row(results)
    assert code == 1, output[-3000:]
    assert row["comparison"].startswith("barlow-twins: 2 gloo ranks")
    assert row["verdict"] == "FAIL" and row["update_rel_diff"] > 1e3 * row["update_tol"]


@pytest.mark.parametrize("mutation", ["diag-plus-one-dropped", "invariance-grad-x0.99"])
def test_wrong_music_gradients_fail(tmp_path, mutation):
    code, results, output = check_parity(tmp_path, "--legs", "backend", "--mutation", mutation)
    row = only_row(results)
    assert code == 1, output[-3000:]
    assert row["verdict"] == "FAIL" and row["update_rel_diff"] > 1e3 * row["update_tol"]


def test_the_mutations_reimplementation_unmutated_passes(tmp_path):
    """The control: the failures above come from the mutations, not the re-implementation."""
    code, results, output = check_parity(tmp_path, "--legs", "backend", "--mutation",
                                         "reimplemented")
    assert code == 0 and only_row(results)["verdict"] == "PASS", output[-3000:]


def test_an_exception_in_a_leg_is_a_fail(tmp_path):
    code, results, output = check_parity(tmp_path, "--legs", "backend", "--mutation", "raise")
    row = only_row(results)
    assert code == 1, output[-3000:]
    assert row["verdict"] == "FAIL" and "injected failure" in row["error"]


def _without_triton(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``import triton`` fails (a shadowing package that raises)."""
    shadow = tmp_path / "shadow"
    (shadow / "triton").mkdir(parents=True)
    (shadow / "triton" / "__init__.py").write_text("raise ImportError('no triton here')\n")
    return {"PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)])}


SKIPPED = "triton: SKIPPED (Triton or its interpreter cannot be imported (no triton here))"


def test_triton_missing_is_a_skip_with_reason_and_fails_when_required(tmp_path):
    code, results, output = check_parity(tmp_path, "--legs", "triton", "--require-triton",
                                         env=_without_triton(tmp_path))
    assert results["notes"][0] == SKIPPED, output[-3000:]
    assert code == 1 and "a FAIL under --require-triton" in output


@pytest.mark.slow
def test_triton_missing_is_only_a_skip_when_not_required(tmp_path):
    code, results, output = check_parity(tmp_path, "--legs", "triton,backend",
                                         env=_without_triton(tmp_path))
    assert code == 0 and results["notes"] == [SKIPPED], output[-3000:]


def test_cuda_mode_dry_run_prints_its_plan(capsys):
    import check_parity

    assert check_parity.main(["--device", "cuda", "--gpus", "2", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "--device cuda" in plan and "--deterministic" in plan
    assert "--backend triton" in plan and "--backend reference" in plan
    assert "torchrun x2 (ranks)" in plan and "--norm batch" in plan
    assert "--dtype" not in plan  # float32 parameters under bf16 autocast
    for loss in ("music", "barlow-twins", "vicreg"):
        assert f"--loss {loss}" in plan
    assert check_parity.main(["--device", "cuda", "--gpus", "1", "--dry-run"]) == 0
    assert "ranks: SKIPPED (1 GPU: needs 2+)" in capsys.readouterr().out


@pytest.mark.parametrize("options, message", [
    (["--legs", "backend,nope"], "--legs: expected"),
    (["--losses", "simclr"], "--losses: expected"),
    (["--device", "cuda", "--mutation", "off-grad-x0.99", "--dry-run"],
     "replaces the MUSIC backend"),
])
def test_bad_options_are_clear_errors(capsys, options, message):
    import check_parity

    with pytest.raises(SystemExit) as exit_:
        check_parity.main(options)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
