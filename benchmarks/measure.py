"""Timing and peak-memory measurement of one benchmark case, on CPU or CUDA.

Time: median and the 20th/80th percentiles of single calls after warm-up
(CUDA: ``triton.testing.do_bench``, which flushes L2 between calls, or CUDA events when Triton
is missing; CPU: ``torch.utils.benchmark.Timer`` with all of torch's threads).

Peak extra memory: what a call allocates above the inputs and their gradient buffers, which
are allocated (and filled) before the measurement so that they belong to the baseline.
CUDA: ``max_memory_allocated`` above ``memory_allocated`` at the start of the call.
CPU: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
above its resident set at the start of the call. Run each CPU case in a fresh process
(``benchmarks.run`` does), with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed
buffers go back to the OS and the warm-up cannot pre-fault the measured call's memory.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.peers import (
    PEERS,
    PRECISION_DTYPE,
    floor_products,
    random_views,
    segment_probabilities,
    set_matmul_precision,
)

MIB = 2.0**20


@dataclass(frozen=True)
class Case:
    """One measurement: a peer at one shape, precision and mode."""

    method: str
    n: int
    d: int
    segment_dim: int
    precision: str
    mode: str

    @property
    def dtype(self) -> str:
        return str(PRECISION_DTYPE[self.precision]).removeprefix("torch.")

    def label(self) -> str:
        return f"{self.method} N={self.n} D={self.d} {self.precision} {self.mode}"


@dataclass(frozen=True)
class Budget:
    """Repetition limits of a suite."""

    warmup_s: float = 0.5
    time_s: float = 2.0
    min_reps: int = 3
    max_reps: int = 50


def build_step(case: Case, device: torch.device) -> Callable[[], None]:
    """A closure running one call of the case (inputs and gradient buffers allocated now)."""
    peer = PEERS[case.method]
    dtype = PRECISION_DTYPE[case.precision]
    set_matmul_precision(case.precision)
    z1, z2 = random_views(case.n, case.d, dtype, device)
    if peer.loss is None:
        a = segment_probabilities(z1, case.segment_dim).to(dtype)
        b = segment_probabilities(z2, case.segment_dim).to(dtype)
        del z1, z2

        def floor_step() -> None:
            with torch.no_grad():
                floor_products(a, b, case.mode)

        return floor_step

    loss_fn = peer.loss
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    # Gradient buffers exist before the call: AccumulateGrad adds into them in place, and
    # they count as the baseline ("beyond the inputs and their gradients").
    z1.grad = torch.zeros_like(z1)
    z2.grad = torch.zeros_like(z2)
    k, precision = case.segment_dim, case.precision

    if case.mode == "forward":

        def forward_step() -> None:
            loss_fn(z1, z2, k, precision)

        return forward_step

    def forward_backward_step() -> None:
        loss_fn(z1, z2, k, precision).backward()

    return forward_backward_step


def _quantiles(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)

    def q(fraction: float) -> float:
        # Linear interpolation between order statistics (numpy's default).
        pos = fraction * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


# ---------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_extra_mib(step: Callable[[], None]) -> float | None:
    """Peak resident memory of one call above the resident memory before it (Linux only)."""
    gc.collect()
    if not _reset_peak_rss():
        return None
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0.0, (peak - before) * 1024 / MIB)


def measure_cpu(case: Case, budget: Budget, what: str = "both") -> dict[str, Any]:
    """Warm up, measure peak extra RSS of one call (``what`` in memory/both), then time
    single calls (``what`` in time/both). ``what="lean"``: :func:`_measure_cpu_lean` with
    ``budget.min_reps`` timed calls (both numbers from one process, for very long calls).

    ``benchmarks.run`` measures memory and time in two fresh processes: memory under
    ``MALLOC_MMAP_THRESHOLD_`` (freed buffers leave the process, so the peak is the call's
    own), time under the default allocator (the low threshold turns every large allocation
    into fresh page faults, which would charge the allocator to the method).
    """
    from torch.utils.benchmark import Timer

    step = build_step(case, torch.device("cpu"))
    if what == "lean":
        return _measure_cpu_lean(step, budget.min_reps, warm_up=budget.warmup_s > 0)
    warm_start = time.perf_counter()
    for _ in range(20):  # at least one call: compilation, thread pools, first touch
        step()
        if time.perf_counter() - warm_start >= budget.warmup_s:
            break
    t0 = time.perf_counter()
    peak = cpu_peak_extra_mib(step) if what != "time" else None
    if what == "time":
        step()
    last = time.perf_counter() - t0  # a post-warm-up call: sizes the repetitions
    if what == "memory":
        return {"peak_extra_mib": peak}
    # blocked_autorange: one more call to size its blocks (single calls here unless a call
    # is under ~2 ms), then blocks until min_run_time; bounded to [min_reps, max_reps] calls.
    min_run_time = min(budget.max_reps * last, max(budget.min_reps * last * 0.98, budget.time_s))
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times_ms = [t * 1e3 for t in measurement.times]
    reps = len(times_ms) * measurement.number_per_run
    return {**_quantiles(times_ms), "repeats": reps, "peak_extra_mib": peak,
            "timer": "torch.utils.benchmark.Timer.blocked_autorange"}


def _measure_cpu_lean(step: Callable[[], None], calls: int, warm_up: bool = True
                      ) -> dict[str, Any]:
    """Few calls in one process: one warm-up call (unless ``warm_up`` is false, for calls of
    a minute), then ``calls`` timed single calls, the first of which also gives the peak
    extra memory (run under the fixed mmap threshold; the page faults it adds are O(N D) per
    call, small next to the call's time)."""
    if warm_up:
        step()
    times_ms, peak = [], None
    for i in range(calls):
        if i == 0:
            gc.collect()
            reset = _reset_peak_rss()
            before = _status_kib("VmRSS")
        t0 = time.perf_counter()
        step()
        times_ms.append((time.perf_counter() - t0) * 1e3)
        if i == 0:
            high = _status_kib("VmHWM")
            if reset and before is not None and high is not None:
                peak = max(0.0, (high - before) * 1024 / MIB)
    return {**_quantiles(times_ms), "repeats": calls, "peak_extra_mib": peak,
            "timer": "time.perf_counter, single calls (lean protocol)", "warm_up": warm_up}


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------
def _cuda_event_times(step: Callable[[], None], warmup_ms: float, rep_ms: float,
                      min_reps: int, max_reps: int) -> list[float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        step()
    reps = int(min(max_reps, max(min_reps, rep_ms / estimate)))
    times = []
    for _ in range(reps):
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def measure_cuda(case: Case, budget: Budget, device: torch.device) -> dict[str, Any]:
    """Peak extra ``max_memory_allocated`` of one call after warm-up, then ``do_bench``."""
    torch.cuda.empty_cache()
    step = build_step(case, device)
    step()  # first call: compilation, autotuning, cuBLAS workspaces
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize(device)
    call_ms = (time.perf_counter() - t0) * 1e3
    peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
    # do_bench repeats for rep_ms: enough for min_reps calls, at most max_reps.
    warmup_ms = budget.warmup_s * 1e3
    rep_ms = min(budget.max_reps * call_ms, max(budget.time_s * 1e3, budget.min_reps * call_ms))
    try:
        from triton.testing import do_bench

        med, p20, p80 = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        timing = {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80),
                  "repeats": None, "timer": "triton.testing.do_bench"}
    except ImportError:
        times = _cuda_event_times(step, warmup_ms, rep_ms, budget.min_reps, budget.max_reps)
        timing = {**_quantiles(times), "repeats": len(times), "timer": "cuda events"}
    del step
    torch.cuda.empty_cache()
    return {**timing, "peak_extra_mib": peak}
