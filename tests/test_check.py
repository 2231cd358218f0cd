"""``python -m music_loss.check`` on CPU, as a user runs it (subprocesses), and the docs' table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_table
from music_loss import check
from tests.tolerances import PRECISION_TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, code=None, interpret=False, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "music_loss.check", *args] if code is None else \
        [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path or ROOT,
                          timeout=300)


def test_check_on_cpu_passes_and_writes_json(tmp_path):
    out = tmp_path / "check.json"
    proc = _run(["--json", str(out), "--repeats", "1"], tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"environment", "results"}
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    results = report["results"]
    assert len(results["auto"]) == 18  # 3 dtypes x 3 matmul precisions x autocast on/off
    ran = {(r["backend"], r["precision"]) for r in results["accuracy"] if r["status"] == "ok"}
    assert {("torch", "ieee"), ("torch", "bf16")} <= ran
    assert all(r["status"] in ("ok", "skipped") for r in results["accuracy"])
    assert {t["what"].split()[0] for t in results["timing"]} == {"music_loss", "matmul"}
    assert all(t["ms"] > 0 for t in results["timing"])
    assert "accuracy: ok" in proc.stdout


def test_check_runs_triton_in_the_interpreter(tmp_path):
    out = tmp_path / "check.json"
    proc = _run(["--json", str(out), "--no-timing"], interpret=True, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    accuracy = json.loads(out.read_text())["results"]["accuracy"]
    ran = {(r["backend"], r["precision"]) for r in accuracy if r["status"] == "ok"}
    assert {("triton", "ieee"), ("triton", "tf32"), ("triton", "bf16")} <= ran


#: A torch backend whose loss is off by 1e-4 relative (a wrong number, not a crash).
WRONG_TORCH_BACKEND = """
import runpy, sys
import music_loss.functional as F
real = F.music_loss
def wrong(*args, **kwargs):
    out = real(*args, **kwargs)
    if kwargs.get("backend") == "torch":
        return out._replace(loss=out.loss * (1 + 1e-4))
    return out
F.music_loss = wrong
sys.argv[0] = "music_loss.check"
runpy.run_module("music_loss.check", run_name="__main__")
"""


def test_accuracy_failure_exits_nonzero(tmp_path):
    out = tmp_path / "check.json"
    proc = _run(["--json", str(out), "--no-timing"], code=WRONG_TORCH_BACKEND,
                tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "accuracy: FAILED" in proc.stdout
    failed = [r for r in json.loads(out.read_text())["results"]["accuracy"]
              if r["status"] == "FAILED"]
    assert {r["backend"] for r in failed} == {"torch"}


def test_plan_for_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = _run(["--plan-for", "7.5", "--json", str(out)], tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    assert plan["capability"] == "7.5"
    assert len(plan["choices"]) == 18
    assert plan["choices"][2] == {"dtype": "float32", "matmul_precision": "high",
                                  "autocast": False, "backend": "torch", "precision": "ieee",
                                  "reason": plan["choices"][2]["reason"]}
    assert {(c["backend"], c["precision"]) for c in plan["choices"]} == {("torch", "ieee")}


def test_plan_for_rejects_a_bad_capability():
    proc = _run(["--plan-for", "7.x"])
    assert proc.returncode == 2 and "capability must look like" in proc.stderr


def test_tolerances_are_the_test_suites():
    assert {k: tuple(v) for k, v in check.TOLERANCES.items()} == \
        {k: tuple(v) for k, v in PRECISION_TOL.items()}


def test_docs_table_is_generated():
    assert gpu_table.committed() == gpu_table.generated(), (
        "docs/gpus.md is stale: run python -m benchmarks.gpu_table --write")


def test_summarize_refuses_mixed_choices():
    choices = check.plan_for("9.0")["choices"]
    choices[2] = {**choices[2], "backend": "torch"}  # matmul "high"; "medium" differs now
    with pytest.raises(ValueError, match="different choices"):
        check.summarize(choices)


def test_runnable_on_a_mocked_small_memory_card(monkeypatch):
    """The GPU side of the check: what it runs on an sm_86 card with tf32 matmuls allowed and
    less shared memory per block (80 KiB) than the float32 configs need."""
    from types import SimpleNamespace

    from music_loss import _dispatch, _gpu_policy

    pytest.importorskip("triton")
    props = SimpleNamespace(name="Mock RTX 3090", major=8, minor=6,
                            shared_memory_per_block_optin=80 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(check, "float32_matmul_mode", lambda: "tf32")
    monkeypatch.setattr(_dispatch, "float32_matmul_mode", lambda: "tf32")
    _gpu_policy.clear_caches()
    try:
        why = {(b, p): w for b, p, w in check.runnable(torch.device("cuda", 0))}
    finally:
        _gpu_policy.clear_caches()
    assert why[("triton", "bf16")] is None and why[("torch", "tf32")] is None
    assert why[("torch", "bf16")] is None
    assert "80 KiB" in why[("triton", "ieee")] and "80 KiB" in why[("triton", "tf32")]
    assert "set_float32_matmul_precision('highest')" in why[("torch", "ieee")]
