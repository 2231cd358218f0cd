"""Smoke tests of the benchmark tooling: runner, float64 gate, memory meter, renderer.

Timing numbers are never asserted (benchmarks, not timed unit tests); what is asserted is
that the tool measures what it says: a peer whose value is wrong is not timed, a known
allocation reads back as its size, the results file holds the schema, and the renderer
turns any such file into a table and plots.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import hardware, peers, run
from benchmarks.measure import Budget, Case
from benchmarks.render import load_results, render
from benchmarks.suites import Suite, get_suite

SCHEMA_KEYS = {"method", "device", "n", "d", "segment_dim", "dtype", "precision", "mode",
               "median_ms", "p20_ms", "p80_ms", "peak_extra_mib", "tflops", "fraction_of_peak"}
META_KEYS = {"device", "driver", "torch", "triton", "music_loss", "git_sha", "date"}


def _broken_loss(z1: torch.Tensor, z2: torch.Tensor, k: int, precision: str) -> torch.Tensor:
    # Off by 1e-3 relative: the kind of error a mis-compiled path shows.
    return barlow(z1, z2, k, precision) * (1 + 1e-3)


def barlow(z1: torch.Tensor, z2: torch.Tensor, k: int, precision: str = "ieee") -> torch.Tensor:
    return peers.PEERS["barlow-twins"].loss(z1, z2, k, precision)  # type: ignore[misc]


@pytest.fixture
def tiny_suite(monkeypatch: pytest.MonkeyPatch) -> Suite:
    broken = peers.Peer("broken", _broken_loss, barlow, 2, 6, 0, "a peer that is 1e-3 off")
    monkeypatch.setitem(peers.PEERS, "broken", broken)
    methods = ["music-triton", "music-torch", "music-reference", "barlow-twins", "vicreg",
               "matmul-floor", "broken"]
    cases = tuple(Case(m, 24, d, 80, "ieee", "forward+backward") for d in (160, 240)
                  for m in methods) + (Case("music-torch", 24, 240, 80, "ieee", "forward"),)
    suite = Suite("tiny", cases, Budget(0.0, 0.0, 1, 2), "test")
    monkeypatch.setattr(run, "get_suite", lambda name, gpu: suite)
    return suite


def test_runner_and_renderer_end_to_end(tiny_suite: Suite, tmp_path: Path) -> None:
    path = run.run_benchmarks(torch.device("cpu"), "tiny", str(tmp_path / "cpu-test.json"),
                              subprocess_per_case=False)
    data = json.loads(path.read_text())
    assert set(data["meta"]) >= META_KEYS
    records = data["records"]
    assert len(records) == len(tiny_suite.cases)
    by = {(r["method"], r["d"], r["mode"]): r for r in records}
    for r in records:
        assert set(r) >= SCHEMA_KEYS
    # Unavailable peers are recorded with the reason, wrong ones are not timed.
    assert by[("music-triton", 160, "forward+backward")]["status"].startswith("skipped: no CUDA")
    broken = by[("broken", 160, "forward+backward")]
    assert broken["status"].startswith("failed: float64 check")
    assert broken["median_ms"] is None and broken["check_value_rel_err"] > 1e-4
    for method in ("music-torch", "music-reference", "barlow-twins", "vicreg", "matmul-floor"):
        r = by[(method, 240, "forward+backward")]
        assert r["status"] == "ok", r
        assert r["check_passed"] and r["check_value_rel_err"] < 1e-5
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_extra_mib"] is not None and r["peak_extra_mib"] >= 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["fraction_of_peak"] is None  # CPU: no tensor-core peak
    assert by[("vicreg", 240, "forward+backward")]["flops"] == 8 * 24 * 240**2

    md_path = render([path])
    md = md_path.read_text()
    assert "## Headline" in md and "## All cases" in md and "## Not measured" in md
    assert "| music-torch |" in md or "| 24 | 240 | music-torch |" in md
    assert "`broken`: failed: float64 check" in md
    pngs = sorted(tmp_path.glob("cpu-test-*.png"))
    assert [p.name for p in pngs] == ["cpu-test-fwd-bwd-ieee-n24-vs-d.png"]
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({pngs[0].name})" in md

    # --resume keeps what is there and runs nothing again.
    again = run.run_benchmarks(torch.device("cpu"), "tiny", str(path),
                               subprocess_per_case=False, resume=True)
    kept = json.loads(again.read_text())["records"]
    assert {run._key(r) for r in kept} >= {run._key(r) for r in records
                                           if not r["status"].startswith("failed")}


def test_cpu_case_in_a_fresh_subprocess() -> None:
    case = Case("vicreg", 16, 160, 80, "ieee", "forward+backward")
    result = run._run_child(case, Budget(0.0, 0.0, 1, 1), timeout_s=120)
    assert result["median_ms"] > 0 and result["peak_extra_mib"] >= 0


_KNOWN_ALLOCATION = """
import torch
from benchmarks.measure import cpu_peak_extra_mib

def allocate():
    buffer = torch.ones({mib} * 2**20 // 4, dtype=torch.float32)  # touched pages
    del buffer

print(cpu_peak_extra_mib(allocate))
"""


def test_cpu_peak_memory_reads_a_known_allocation() -> None:
    # In a fresh process, as the benchmarks measure: in a long-lived one (this test run) the
    # allocator may serve the buffer from pages that an earlier test left resident.
    size_mib = 64
    done = subprocess.run([sys.executable, "-c", _KNOWN_ALLOCATION.format(mib=size_mib)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    peak = done.stdout.strip().splitlines()[-1]
    if peak == "None":
        pytest.skip("no /proc/self/clear_refs on this OS")
    assert size_mib * 0.95 <= float(peak) <= size_mib * 1.25


def test_peak_table_and_flops() -> None:
    assert hardware.peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert hardware.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert hardware.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert hardware.peak_tflops("Some Unknown GPU", "bf16") is None
    assert peers.PEERS["music-torch"].flops(2048, 8160, "forward+backward") == 6 * 2048 * 8160**2
    assert peers.PEERS["matmul-floor"].flops(2, 3, "forward") == 2 * 2 * 9


def test_suites_cover_the_issue() -> None:
    quick = get_suite("quick", gpu=False)
    headline = {(c.method, c.mode) for c in quick.cases if (c.n, c.d) == (512, 8160)}
    for method in ("music-torch", "music-reference", "music-reference-compiled",
                   "barlow-twins", "vicreg", "matmul-floor"):
        assert (method, "forward+backward") in headline and (method, "forward") in headline
    core = get_suite("gpu-core", gpu=True)
    assert {c.precision for c in core.cases} == {"tf32", "bf16", "ieee"}
    assert {c.d for c in core.cases} == {960, 2000, 4080, 8160, 16320}
    assert {c.n for c in core.cases} == {256, 512, 1024, 2048, 4096}


def test_results_loader_rejects_other_json(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a benchmark results file"):
        load_results([bad])


@pytest.mark.slow
def test_compiled_reference_agrees_with_float64() -> None:
    check = peers.check_peer("music-reference-compiled", torch.device("cpu"), "ieee")
    assert check.passed, check


@pytest.mark.gpu
def test_gpu_suite_runs_every_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    methods = ["music-triton", "music-torch", "music-reference", "music-reference-compiled",
               "barlow-twins", "vicreg", "matmul-floor"]
    cases = tuple(Case(m, 256, 960, 80, precision, mode) for precision in ("tf32", "bf16")
                  for mode in ("forward+backward", "forward") for m in methods)
    suite = Suite("tiny-gpu", cases, Budget(0.01, 0.02, 3, 10), "test")
    monkeypatch.setattr(run, "get_suite", lambda name, gpu: suite)
    path = run.run_benchmarks(torch.device("cuda"), "tiny-gpu", str(tmp_path / "gpu.json"))
    records = json.loads(path.read_text())["records"]
    assert len(records) == len(cases)
    for r in records:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["peak_extra_mib"] >= 0
    name = torch.cuda.get_device_name()
    if hardware.peak_tflops(name, "tf32") is not None:
        assert all(r["fraction_of_peak"] is not None for r in records)
    render([path], plots=False)
