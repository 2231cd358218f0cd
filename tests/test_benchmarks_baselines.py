"""Smoke test of the peers-at-equal-engineering sweep (``benchmarks.baselines_sweep``).

Tiny shapes, in process: every method of the sweep is checked against float64 and measured,
cases predicted over the memory cap are skipped with their prediction, the lean protocol
records its number of calls, and the page renders tables, exponents and plots. Timings are
never asserted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import baselines_sweep, run
from benchmarks.measure import Budget, Case, measure_cpu
from benchmarks.suites import BASELINE_PEERS, Suite, get_suite


def test_fit_exponent_recovers_a_power_law() -> None:
    xs = [2000, 4080, 8160, 16320]
    assert baselines_sweep.fit_exponent(xs, [3e-6 * x**2.0 for x in xs]) == pytest.approx(2.0)
    assert baselines_sweep.fit_exponent(xs, [7.0 * x for x in xs]) == pytest.approx(1.0)
    assert baselines_sweep.fit_exponent([512], [1.0]) is None


def test_baselines_suite_covers_the_sweep() -> None:
    suite = get_suite("baselines", gpu=False)
    cases = {(c.method, c.n, c.d) for c in suite.cases}
    for method in BASELINE_PEERS:
        for d in (2000, 4080, 8160, 16320, 32640):
            assert (method, 512, d) in cases
        for n in (256, 512, 1024, 2048):
            assert (method, n, 8160) in cases
    big = next(c for c in suite.cases if c.d == 32640)
    small = next(c for c in suite.cases if c.d == 16320)
    assert suite.is_lean(big) and suite.is_cold(big) and not suite.is_cold(small)
    # The official losses at D=32640 are predicted over the 20 GiB cap, the light ones not.
    assert suite.max_predicted_gib == 20.0
    for method, over in (("barlow-twins", True), ("vicreg", True), ("music-reference", True),
                         ("barlow-twins-light", False), ("vicreg-light", False)):
        needed = run._memory_needed_bytes(Case(method, 512, 32640, 80, "ieee",
                                               "forward+backward"))
        assert (needed > 20 * 2**30) == over, method
    # The GPU suites carry the memory-light peers too.
    for name in ("gpu-headline", "gpu-core"):
        methods = {c.method for c in get_suite(name, gpu=True).cases}
        assert {"barlow-twins-light", "vicreg-light"} <= methods


def test_lean_protocol_records_its_calls() -> None:
    case = Case("barlow-twins-light", 16, 160, 80, "ieee", "forward+backward")
    result = measure_cpu(case, Budget(0.1, 0.0, 3, 3), "lean")
    assert result["repeats"] == 3 and result["warm_up"] is True
    assert result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]
    cold = measure_cpu(case, Budget(0.0, 0.0, 4, 4), "lean")
    assert cold["repeats"] == 4 and cold["warm_up"] is False


def test_sweep_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smoke = get_suite("baselines-smoke", gpu=False)
    # One case predicted over a cap of 1 MiB: skipped with the prediction, never run.
    over = Case("barlow-twins", 32, 640, 80, "ieee", "forward+backward")
    suite = Suite("tiny-baselines", smoke.cases + (over,), Budget(0.0, 0.0, 3, 3), "test",
                  max_predicted_gib=run._memory_needed_bytes(over) / 2**30 * 0.99)
    monkeypatch.setattr(run, "get_suite", lambda name, gpu: suite)
    path = run.run_benchmarks(torch.device("cpu"), "tiny-baselines",
                              str(tmp_path / "cpu-test-baselines.json"),
                              subprocess_per_case=False, extra_meta={"machine_note": "note"})
    data = json.loads(path.read_text())
    assert data["meta"]["machine_note"] == "note"
    by = {(r["method"], r["n"], r["d"]): r for r in data["records"]}
    assert by[("barlow-twins", 32, 640)]["status"].startswith("skipped: predicted")
    for method in BASELINE_PEERS:
        for d in (160, 320):
            r = by[(method, 32, d)]
            assert r["status"] == "ok", r["status"]
            assert r["median_ms"] > 0 and r["peak_extra_mib"] is not None
            if method != "matmul-floor":
                assert r["check_passed"] is True
    exps = baselines_sweep.exponents(data["records"])
    assert set(exps) == set(BASELINE_PEERS)
    assert all(math.isfinite(e["time_vs_d"]) for e in exps.values())
    pytest.importorskip("matplotlib")
    md = baselines_sweep.render(path).read_text()
    assert "| barlow-twins-light | 320 |" in md and "time ~ D^a" in md
    assert "`barlow-twins-light` / `barlow-twins`" in md
    for suffix in ("-d.png", "-n.png"):
        assert path.with_name(path.stem + suffix).stat().st_size > 1000
