"""Benchmark MUSIC against Barlow Twins, VICReg and the matmul floor; write a results JSON.

Usage::

    python -m benchmarks.run --device cpu --suite quick --out benchmarks/results/
    python -m benchmarks.run --device cuda --suite gpu-core --out benchmarks/results/
    python -m benchmarks.run --suite distributed   # sharded vs unsharded, W = 1, 2, 4
    python -m benchmarks.render benchmarks/results/<device>-<date>.json

Each peer is first checked against float64 on a small case at the run's device and
precision (:func:`benchmarks.peers.check_peer`); a peer that fails is recorded, not timed.
On CPU every case runs in a fresh subprocess so that its peak resident memory is its own.
The results file is rewritten after every case, so an interrupted run keeps what it measured;
``--resume`` skips the cases the file already holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import hardware
from benchmarks.measure import Budget, Case, measure_cpu, measure_cuda
from benchmarks.peers import PEERS, CheckResult, check_peer, unavailable_reason
from benchmarks.suites import ALL_PEERS, get_suite

RESULT_MARKER = "@@BENCH_RESULT@@ "
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Fixed mmap threshold: glibc then returns every buffer >= 64 KiB to the OS when freed, so a
#: warm-up cannot leave pages resident that the measured call would reuse (see measure.py).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _record(case: Case, device: torch.device, status: str, **fields: Any) -> dict[str, Any]:
    """One results row with every schema key present (``None`` where not measured)."""
    row: dict[str, Any] = {
        "method": case.method, "device": device.type, "n": case.n, "d": case.d,
        "segment_dim": case.segment_dim, "dtype": case.dtype, "precision": case.precision,
        "mode": case.mode, "median_ms": None, "p20_ms": None, "p80_ms": None,
        "peak_extra_mib": None, "tflops": None, "fraction_of_peak": None, "status": status,
    }
    row.update(fields)
    return row


def _derived(case: Case, device: torch.device, device_name: str,
             timing: dict[str, Any]) -> dict[str, Any]:
    flops = PEERS[case.method].flops(case.n, case.d, case.mode)
    tflops = flops / (timing["median_ms"] * 1e-3) / 1e12 if timing.get("median_ms") else None
    peak = hardware.peak_tflops(device_name, case.precision) if device.type == "cuda" else None
    return {"flops": flops, "tflops": tflops,
            "fraction_of_peak": tflops / peak if (tflops is not None and peak) else None,
            "peak_tflops": peak}


def _memory_needed_bytes(case: Case) -> float:
    """Rough peak of a case: the peer's D x D buffers plus a few N x D ones (float32)."""
    peer = PEERS[case.method]
    return 4.0 * (peer.dd_buffers * case.d * case.d + 8 * case.n * case.d)


def _memory_available_bytes(device: torch.device) -> float | None:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _run_child(case: Case, budget: Budget, timeout_s: float,
               lean_calls: int | None = None, warm_up: bool = True) -> dict[str, Any]:
    """Measure a CPU case in two fresh interpreters (memory, then time); merge or raise.

    ``lean_calls``: one fresh interpreter instead, under the memory setting, running the
    lean protocol with that many timed calls (after a warm-up call if ``warm_up``)."""
    if lean_calls is not None:
        lean = dataclasses.replace(budget, min_reps=lean_calls,
                                   warmup_s=budget.warmup_s if warm_up else 0.0)
        return {**_run_child_once(case, lean, timeout_s, "lean"), "protocol": "lean"}
    memory = _run_child_once(case, budget, timeout_s, "memory")
    timing = _run_child_once(case, budget, timeout_s, "time")
    return {**timing, "peak_extra_mib": memory["peak_extra_mib"], "protocol": "standard"}


def _run_child_once(case: Case, budget: Budget, timeout_s: float, what: str) -> dict[str, Any]:
    payload = json.dumps({"case": dataclasses.asdict(case), "budget": dataclasses.asdict(budget),
                          "what": what})
    # The low mmap threshold makes the memory reading exact but slows large allocations.
    env = {**os.environ, **CHILD_ENV} if what in ("memory", "lean") else dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--child", payload],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARKER):])
            return result
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    if proc.returncode < 0:
        tail = f"killed by signal {-proc.returncode} (out of memory?); {tail}"
    raise RuntimeError(tail[:300])


def child_main(payload: str) -> None:
    """Entry point of the per-case CPU subprocess: print one marked JSON line."""
    spec = json.loads(payload)
    case, budget = Case(**spec["case"]), Budget(**spec["budget"])
    result = measure_cpu(case, budget, spec.get("what", "both"))
    print(RESULT_MARKER + json.dumps(result), flush=True)


def _progress(cases: list[Case]) -> Iterator[Case]:
    try:
        from tqdm import tqdm
    except ImportError:  # the GPU machine's image may lack tqdm: plain lines then
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.label()}", flush=True)
            yield case
        return
    bar = tqdm(cases, desc="benchmark", unit="case", dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case.label())
        yield case


def _log(message: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(message)
    except ImportError:
        print(message, flush=True)


def _format_row(row: dict[str, Any]) -> str:
    if row["median_ms"] is None:
        return f"  {row['method']:<25} N={row['n']:<5} D={row['d']:<6} {row['mode']:<17} " \
               f"{row['status']}"
    mem = row["peak_extra_mib"]
    return (f"  {row['method']:<25} N={row['n']:<5} D={row['d']:<6} {row['mode']:<17} "
            f"{row['median_ms']:10.2f} ms  [{row['p20_ms']:.2f}, {row['p80_ms']:.2f}]  "
            f"{'n/a' if mem is None else f'{mem:9.1f}'} MiB  {row['tflops']:.3f} TFLOP/s")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["method"], row["n"], row["d"], row["segment_dim"], row["precision"], row["mode"])


def _write(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    os.replace(tmp, path)


def output_path(out: str, device: torch.device) -> Path:
    """``--out``: a ``.json`` file, or a folder that gets ``<device>-<date>.json``."""
    target = Path(out)
    if target.suffix == ".json":
        return target
    date = _dt.date.today().isoformat()
    return target / f"{hardware.device_slug(device)}-{date}.json"


def run_benchmarks(
    device: torch.device,
    suite_name: str,
    out: str,
    only: Iterable[str] | None = None,
    subprocess_per_case: bool | None = None,
    case_timeout_s: float = 900.0,
    resume: bool = False,
    gate: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Run a suite and write its results file; return the file's path.

    Args:
        device: ``cpu`` or a CUDA device.
        suite_name: ``quick``, ``full``, ``gpu-core`` or ``smoke``.
        out: A folder (the file is named ``<device>-<date>.json``) or a ``.json`` path.
        only: Peer names to run (all when ``None``).
        subprocess_per_case: CPU only: a fresh process per case (default), so that peak
            resident memory is the case's own. ``False`` measures in this process (faster,
            memory less trustworthy), for smoke tests.
        case_timeout_s: Limit per CPU subprocess.
        resume: Keep the records of cases already in the file and run only the rest.
        gate: Do not time a peer that fails its float64 check (``False``: time it anyway;
            the record keeps ``check_passed: false`` and the errors).
        extra_meta: More fields for the results' ``meta`` (e.g. notes on the machine).

    Example:
        >>> run_benchmarks(torch.device("cpu"), "smoke", "/tmp/bench.json",
        ...                only=["vicreg"], subprocess_per_case=False)  # doctest: +SKIP
        PosixPath('/tmp/bench.json')
    """
    gpu = device.type == "cuda"
    suite = get_suite(suite_name, gpu)
    wanted = set(only) if only else {case.method for case in suite.cases}
    unknown = wanted - set(PEERS)
    if unknown:
        raise ValueError(f"--only: unknown peer(s) {sorted(unknown)}; choose from "
                         f"{', '.join(PEERS)}")
    cases = [c for c in suite.cases if c.method in wanted]
    if subprocess_per_case is None:
        subprocess_per_case = not gpu
    path = output_path(out, device)
    meta = hardware.collect_meta(device, suite.name)
    meta["suite_description"] = suite.description
    meta["memory_method"] = (
        "torch.cuda.max_memory_allocated above memory_allocated before the call" if gpu else
        "peak RSS (VmHWM after /proc/self/clear_refs) above RSS before the call, "
        + ("fresh subprocess per case" if subprocess_per_case else "in-process"))
    meta["peers"] = {name: PEERS[name].description for name in PEERS if name in wanted}
    meta.update(extra_meta or {})
    records: list[dict[str, Any]] = []
    if resume and path.exists():
        previous = json.loads(path.read_text())["records"]
        keys = {(c.method, c.n, c.d, c.segment_dim, c.precision, c.mode) for c in cases}
        records = [r for r in previous if _key(r) in keys and not r["status"].startswith("failed")]
        done = {_key(r) for r in records}
        cases = [c for c in cases if (c.method, c.n, c.d, c.segment_dim, c.precision, c.mode)
                 not in done]
    device_name = meta["device"]
    _log(f"{suite.name} suite on {device_name}: {len(cases)} cases -> {path}")
    _write(path, meta, records)

    checks: dict[tuple[str, str], CheckResult | str] = {}
    for case in _progress(cases):
        reason = unavailable_reason(case.method, device)
        if reason is not None:
            records.append(_record(case, device, f"skipped: {reason}"))
            continue
        check_key = (case.method, case.precision)
        if check_key not in checks:
            try:
                checks[check_key] = check_peer(case.method, device, case.precision)
            except Exception as err:  # a broken peer must not stop the run
                checks[check_key] = f"{type(err).__name__}: {err}"[:300]
            _log(f"check vs float64: {case.method} {case.precision}: {checks[check_key]}")
        check = checks[check_key]
        if isinstance(check, str):
            records.append(_record(case, device, f"failed: check raised {check}"))
            continue
        if not check.passed and gate:
            records.append(_record(case, device, "failed: float64 check over tolerance "
                                   f"{check.tolerance}", **check.as_dict()))
            continue
        needed, available = _memory_needed_bytes(case), _memory_available_bytes(device)
        cap = suite.max_predicted_gib
        if cap is not None and needed > cap * 2**30:
            records.append(_record(case, device, f"skipped: predicted ~{needed / 2**30:.1f} GiB "
                                   f"({PEERS[case.method].dd_buffers:g} D x D float32 buffers "
                                   f"+ 8 N x D), over the suite's {cap:g} GiB",
                                   **check.as_dict()))
            continue
        if available is not None and needed > 0.8 * available:
            records.append(_record(case, device, f"skipped: needs ~{needed / 2**30:.1f} GiB, "
                                   f"{available / 2**30:.1f} GiB free", **check.as_dict()))
            continue
        load = hardware.load_average()
        check_fields = {**check.as_dict(), "load_1min": load[0] if load else None}
        try:
            if gpu:
                timing = measure_cuda(case, suite.budget, device)
            elif subprocess_per_case:
                timing = _run_child(case, suite.budget, case_timeout_s,
                                    suite.lean_calls if suite.is_lean(case) else None,
                                    warm_up=not suite.is_cold(case))
            else:
                timing = measure_cpu(case, suite.budget)
            derived = _derived(case, device, device_name, timing)
            row = _record(case, device, "ok", **timing, **derived, **check_fields)
        except subprocess.TimeoutExpired:
            row = _record(case, device, f"failed: over the {case_timeout_s:.0f} s case limit")
        except Exception as err:
            if gpu:
                torch.cuda.empty_cache()
            detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            _log(traceback.format_exc(limit=3))
            row = _record(case, device, f"failed: {detail[:300]}", **check_fields)
        records.append(row)
        _log(_format_row(row))
        meta["load_average_end"] = hardware.load_average()
        _write(path, meta, records)
    meta["load_average_end"] = hardware.load_average()
    meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _write(path, meta, records)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--suite", default="quick",
                        choices=["quick", "full", "gpu-core", "gpu-headline", "headline", "smoke",
                                 "baselines", "baselines-smoke", "distributed"])
    parser.add_argument("--only", default=None,
                        help=f"comma-separated peers to run, from: {', '.join(ALL_PEERS)}")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"),
                        help="results folder (file <device>-<date>.json) or a .json path")
    parser.add_argument("--no-gate", action="store_true",
                        help="time peers even when their float64 check is over tolerance "
                             "(the record keeps check_passed=false)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already in the results file, run the rest")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: measure in this process instead of one subprocess per case")
    parser.add_argument("--case-timeout", type=float, default=900.0,
                        help="seconds allowed per CPU case (default 900)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: only cpu and cuda are supported")
    if args.suite == "distributed":  # its own runner: W processes per case
        from benchmarks.distributed import run_suite

        print(f"wrote {run_suite(device, args.out)} (+ .md, .png)")
        return
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    if args.list:
        suite = get_suite(args.suite, device.type == "cuda")
        for case in suite.cases:
            if only is None or case.method in only:
                print(case.label())
        return
    start = time.perf_counter()
    path = run_benchmarks(device, args.suite, args.out, only,
                          subprocess_per_case=False if args.in_process else None,
                          case_timeout_s=args.case_timeout, resume=args.resume,
                          gate=not args.no_gate)
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s; render with: "
          f"python -m benchmarks.render {path}")


if __name__ == "__main__":
    main()
