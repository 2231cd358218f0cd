"""The whole GPU validation in one rerunnable command.

Usage (GPU machine, no internet; ``make gpu-validate`` does the same)::

    python -m benchmarks.gpu_validate                 # about 8 minutes on one H100
    python -m benchmarks.gpu_validate --dry-run       # CPU, toy shapes, interpreter (CI)

Steps, most important first, each in its own process with its own time limit (a step that
fails or runs out of time is recorded and the next one runs: nothing CPU-side can stop the
GPU steps, and no pytest ``-x``):

1. ``gpu-tests``: ``pytest -m gpu tests`` (the paper's shape against float64 per precision,
   N*D >= 2**31 against the torch backend, torch.compile with no graph break);
2. ``benchmark``: the ``gpu-headline`` suite (N=2048, D=8160, K=80, tf32 and bf16, fused vs
   every peer, fraction of the dense tensor-core peak, the matmul floor), then its table;
3. ``profile``: per-phase timing of the fused path (``benchmarks.profile``);
4. ``kernel-tests``: ``pytest tests/kernels -m "not gpu"`` (the interpreter suite's small odd
   shapes, compiled, on real tensor cores);
5. ``tma-tests``, ``tma-profile``: the same with the opt-in TMA products
   (``MUSIC_LOSS_TMA=1``): paper shape and small shapes, then the per-phase profile;
6. ``parity``: ``examples/imagenet/check_parity.py --device cuda`` when it has that option;
7. ``bench-synthetic``: ``examples/imagenet/bench_synthetic.py`` when torchvision imports;
8. ``ws-tests``, ``ws-profile``: the opt-in warp-specialised joint kernel
   (``MUSIC_LOSS_WARP_SPECIALIZE=1``, bf16 on sm_90): paper shape and small shapes, then
   the per-phase profile.

Results go to ``benchmarks/results/gpu-validate-<device>-<date>/`` as they come: one log
per step, ``summary.json`` (card, driver, versions, date, commit, each step's status and
seconds) and ``summary.md``, rewritten after every step. Run it again and the steps already
passed in that folder are skipped (``--fresh`` reruns all), and the benchmark resumes
case by case. Installs nothing from the internet: if ``music_loss.kernels`` does not import,
it runs ``pip install --no-build-isolation --no-deps -e .`` (GPU runs only).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    """One validation step: a command, its time limit, or the reason it cannot run here."""

    name: str
    what: str
    command: list[str] = field(default_factory=list)
    timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    skip_reason: str | None = None


def _python_has(module: str, python: str) -> bool:
    """Whether ``module`` imports under ``python`` (another process: no side effects here)."""
    code = f"import {module}"
    return subprocess.run([python, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          timeout=300).returncode == 0


def _has_option(script: Path, option: str, python: str) -> bool:
    """Whether ``script --help`` lists ``option`` (examples gain options independently)."""
    if not script.exists():
        return False
    out = subprocess.run([python, str(script), "--help"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    return out.returncode == 0 and option in out.stdout


def plan(dry_run: bool, out_dir: Path, python: str) -> list[Step]:
    """The steps in run order; ``dry_run``: the same steps on CPU at toy shapes.

    Example:
        >>> [s.name for s in plan(True, Path("/tmp/x"), sys.executable)][:3]
        ['gpu-tests', 'self-check', 'benchmark']
    """
    py = [python]
    pytest = [*py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    interp = {"TRITON_INTERPRET": "1"} if dry_run else {}
    bench_json = out_dir / "benchmark.json"
    steps = [
        Step("gpu-tests", "GPU tests: paper shape vs float64, int64 offsets, torch.compile",
             [*pytest, "-s", "-m", "gpu", "tests",
              f"--junitxml={out_dir / 'gpu-tests.xml'}"]
             + (["--collect-only"] if dry_run else []),
             timeout_s=120 if dry_run else 240, env=interp),
        Step("self-check", "python -m music_loss.check: every backend and precision on the "
             "card against float64, what auto picks, a timing",
             [*py, "-m", "music_loss.check", "--json", str(out_dir / "check.json")]
             + (["--device", "cpu", "--no-timing"] if dry_run else []),
             timeout_s=120, env=interp),
        Step("benchmark", "gpu-headline: N=2048 D=8160 K=80, tf32+bf16, every peer",
             [*py, "-m", "benchmarks.run", "--resume", "--out", str(bench_json)]
             + (["--device", "cpu", "--suite", "smoke", "--in-process", "--only",
                 "music-triton,music-reference,barlow-twins-light,vicreg-light,"
                 "matmul-floor"] if dry_run
                else ["--device", "cuda", "--suite", "gpu-headline"]),
             timeout_s=300 if dry_run else 240, env=interp),
        Step("benchmark-table", "render the benchmark's table (and plots with matplotlib)",
             [*py, "-m", "benchmarks.render", str(bench_json)]
             + ([] if importlib.util.find_spec("matplotlib") else ["--no-plots"]),
             timeout_s=120),
        Step("profile", "per-phase timing of the fused path",
             [*py, "-m", "benchmarks.profile", "--json", str(out_dir / "profile.json")]
             + (["--n", "16", "--d", "40", "--k", "20", "--precision", "ieee", "tf32",
                 "--repeats", "1"] if dry_run else ["--n", "2048", "--d", "8160", "--k", "80",
                                                    "--precision", "tf32", "bf16"]),
             timeout_s=120 if dry_run else 90, env=interp),
        Step("kernel-tests", "kernel tests at small odd shapes (compiled on a GPU)",
             [*pytest, "-s", "-m", "not gpu and not slow", "tests/kernels", "-k",
             "(N20xD24 or truncation or nearest_tf32) and not aot" if dry_run else "not aot",
             f"--junitxml={out_dir / 'kernel-tests.xml'}"],
             timeout_s=300 if dry_run else 120, env=interp),
        # The opt-in TMA products (sm_90): correctness at the paper's shape and at small odd
        # shapes, then the per-phase profile with them (compare with the profile step's).
        Step("tma-tests", "MUSIC_LOSS_TMA=1: paper shape vs float64, TMA vs pointer products",
             [*pytest, "-s", "tests/kernels", "-k",
              "tma_kernels and K8" if dry_run else "tma_kernels or paper_shape",
              f"--junitxml={out_dir / 'tma-tests.xml'}"],
             timeout_s=120 if dry_run else 150, env={**interp, "MUSIC_LOSS_TMA": "1"}),
        Step("tma-profile", "MUSIC_LOSS_TMA=1: per-phase timing of the fused path",
             [*py, "-m", "benchmarks.profile", "--json",
              str(out_dir / "profile-tma.json")]
             + (["--n", "16", "--d", "40", "--k", "20", "--precision", "tf32", "--repeats", "1"]
                if dry_run else ["--n", "2048", "--d", "8160", "--k", "80", "--precision",
                                 "tf32", "bf16"]),
             timeout_s=120 if dry_run else 90, env={**interp, "MUSIC_LOSS_TMA": "1"}),
    ]
    parity = REPO_ROOT / "examples" / "imagenet" / "check_parity.py"
    device = "cpu" if dry_run else "cuda"
    parity_step = Step("parity", "examples/imagenet/check_parity.py on the device",
                       [*py, str(parity), "--device", device, "--json",
                        str(out_dir / "parity.json")], timeout_s=120, env=interp)
    if not _has_option(parity, "--device", python):
        parity_step.skip_reason = "check_parity.py has no --device option (yet)"
    elif dry_run:
        parity_step.skip_reason = "dry run: check_parity has its own CPU test"
    steps.append(parity_step)
    synthetic = Step("bench-synthetic", "examples/imagenet/bench_synthetic.py (ResNet-50 step)",
                     [*py, "examples/imagenet/bench_synthetic.py", "--output-dir",
                      str(out_dir / "bench_synthetic")]
                     + (["--device", "cpu", "--arch", "resnet18", "--image-size", "32",
                         "--projector", "64-60", "--batch-size", "4", "--steps", "2",
                         "--configs", "music-triton"] if dry_run
                        else ["--steps", "15"]),
                     timeout_s=240 if dry_run else 120, env=interp)
    if not _python_has("torchvision", python):
        synthetic.skip_reason = "torchvision does not import"
    steps.append(synthetic)
    # The opt-in warp-specialised joint kernel (sm_90, bf16): correctness at the paper's shape
    # and at small odd shapes, then the per-phase profile with it (compare with the profile
    # step's bf16 joint pass): what decides whether it becomes the default.
    ws_env = {**interp, "MUSIC_LOSS_WARP_SPECIALIZE": "1"}
    steps.append(Step(
        "ws-tests", "MUSIC_LOSS_WARP_SPECIALIZE=1: paper shape vs float64, small shapes",
        [*pytest, "-s", "tests/kernels", "-k",
         "warp_specialized and K8" if dry_run else "warp_specialize or paper_shape",
         f"--junitxml={out_dir / 'ws-tests.xml'}"],
        timeout_s=120 if dry_run else 150, env=ws_env))
    steps.append(Step(
        "ws-profile", "MUSIC_LOSS_WARP_SPECIALIZE=1: per-phase timing of the fused path (bf16)",
        [*py, "-m", "benchmarks.profile", "--json", str(out_dir / "profile-ws.json")]
        + (["--n", "16", "--d", "40", "--k", "20", "--precision", "bf16", "--repeats", "1"]
           if dry_run else ["--n", "2048", "--d", "8160", "--k", "80", "--precision", "bf16"]),
        timeout_s=120 if dry_run else 90, env=ws_env))
    return steps


def _environment(dry_run: bool) -> dict[str, Any]:
    """Card, driver, versions, date and commit (read in this process, no installs)."""
    import torch

    from benchmarks import hardware

    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    meta = hardware.collect_meta(device, "gpu-validate")
    meta.pop("command", None)
    meta.update(dry_run=dry_run, platform=platform.platform(),
                command=" ".join(["python", "-m", "benchmarks.gpu_validate", *sys.argv[1:]]))
    return meta


def _ensure_importable(python: str) -> str | None:
    """``pip install --no-build-isolation --no-deps -e .`` when ``music_loss.kernels`` does
    not import (offline: no dependency is fetched). Returns a problem, or None."""
    if _python_has("music_loss.kernels", python):
        return None
    out = subprocess.run([python, "-m", "pip", "install", "-q", "--no-build-isolation",
                          "--no-deps", "-e", "."], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0 or not _python_has("music_loss.kernels", python):
        return "music_loss.kernels does not import: " + (out.stderr or out.stdout)[-400:]
    return None


def run_step(step: Step, log_path: Path, limit_s: float) -> dict[str, Any]:
    """Run one step in its own process group with a time limit; never raises."""
    record: dict[str, Any] = {"name": step.name, "what": step.what,
                              "command": " ".join(step.command), "log": log_path.name}
    if step.skip_reason:
        return {**record, "status": f"skipped: {step.skip_reason}", "seconds": 0.0}
    if limit_s < 10:
        return {**record, "status": "skipped: out of time budget", "seconds": 0.0}
    env = {**os.environ, **step.env}
    if not step.env.get("TRITON_INTERPRET"):
        env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write(f"$ {record['command']}\n")
        log.flush()
        proc = subprocess.Popen(step.command, cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=min(step.timeout_s, limit_s))
            status = "passed" if code == 0 else f"failed: exit status {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group only
            proc.wait()
            status = f"failed: over its {min(step.timeout_s, limit_s):.0f} s limit"
    record.update(status=status, seconds=round(time.perf_counter() - start, 1))
    record["tail"] = _tail(log_path)
    return record


def _tail(path: Path, lines: int = 12) -> list[str]:
    text = path.read_text(errors="replace").splitlines()
    return [re.sub(r"\s+$", "", line)[:200] for line in text[-lines:]]


def render(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    meta = summary["environment"]
    lines = [f"# GPU validation ({'dry run, CPU' if meta.get('dry_run') else meta['device']})",
             "",
             f"- device: {meta['device']}; driver {meta.get('driver')}; CUDA {meta.get('cuda')}",
             f"- torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}",
             f"- date {meta['date']}; commit {meta['git_sha']}",
             "", "| step | status | seconds | what |", "|---|---|---:|---|"]
    for step in summary["steps"]:
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.0f} | "
                     f"{step['what']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 when every step that ran passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, toy shapes, Triton's interpreter (what CI runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results/gpu-validate-"
                             "<device>-<date>/)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="total seconds for the steps (default 540); later steps are "
                             "skipped when it is spent")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun steps that already passed in the results folder")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    env_meta = _environment(args.dry_run)
    if not args.dry_run and env_meta["device_type"] != "cuda":
        print("no CUDA device is visible: run with --dry-run on CPU", file=sys.stderr)
        return 2
    slug = re.sub(r"[^a-z0-9]+", "-", env_meta["device"].lower()).strip("-")
    if args.dry_run:
        slug = "dry-run-cpu"
    out_dir = args.out or (REPO_ROOT / "benchmarks" / "results"
                           / f"gpu-validate-{slug}-{_dt.date.today().isoformat()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "summary.json"
    previous: dict[str, dict[str, Any]] = {}
    if summary_path.exists() and not args.fresh:
        previous = {s["name"]: s for s in json.loads(summary_path.read_text())["steps"]}
    summary: dict[str, Any] = {"environment": env_meta, "steps": []}

    def write() -> None:
        summary_path.write_text(json.dumps(summary, indent=1))
        (out_dir / "summary.md").write_text(render(summary))

    problem = None if args.dry_run else _ensure_importable(args.python)
    if problem:
        summary["steps"].append({"name": "install", "what": "pip install -e . (offline)",
                                 "status": f"failed: {problem}", "seconds": 0.0})
    write()
    for step in plan(args.dry_run, out_dir, args.python):
        done = previous.get(step.name)
        if done is not None and done["status"] == "passed":
            summary["steps"].append({**done, "status": "passed", "rerun": "kept"})
            print(f"[gpu-validate] {step.name}: passed before, kept", flush=True)
            write()
            continue
        left = args.budget_s - (time.perf_counter() - start)
        print(f"[gpu-validate] {step.name}: {step.what} ({left:.0f} s of budget left)",
              flush=True)
        record = run_step(step, out_dir / f"{step.name}.log", left)
        summary["steps"].append(record)
        print(f"[gpu-validate] {step.name}: {record['status']} ({record['seconds']:.0f} s)",
              flush=True)
        write()
    print(render(summary))
    print(f"results in {out_dir}")
    return 0 if all(s["status"] == "passed" or s["status"].startswith("skipped")
                    for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
