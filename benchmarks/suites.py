"""The benchmark suites: which peers run at which shapes, precisions and modes.

* ``quick`` (CPU, about 10 minutes on 2 cores): D sweep at N=512 up to D=8160, the
  N=512, D=8160 forward-only case, and an N sweep at D=2000.
* ``full``: the sweeps: D in {960, 2000, 4080, 8160, 16320} at the paper's N=2048,
  N in {256, ..., 4096} at D=8160, forward-only at the paper's shape. Hours on CPU.
* ``gpu-core`` (CUDA, about 10 minutes on one H100): the ``full`` sweeps in tf32 and bf16,
  ``torch.compile`` only at the paper's shape (each shape compiles anew), plus the paper's
  shape in ieee fp32 for the MUSIC paths and the floor.
* ``gpu-headline`` (CUDA, a few minutes): the paper's shape alone, every peer, tf32 and bf16,
  forward+backward (``make gpu-validate``'s benchmark step).
* ``headline``: the N=512, D=8160 forward+backward case alone (a replicate, minutes).
* ``baselines`` (CPU, about 35 minutes on 2 idle cores): MUSIC's ``torch`` path beside
  the memory-light and the official Barlow Twins and VICReg, the reference and the floor;
  D in {2000, ..., 32640} at N=512 and N in {256, ..., 2048} at D=8160, lean protocol
  (``benchmarks.baselines_sweep`` renders it with fitted growth exponents).
* ``smoke``: tiny shapes for the tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from benchmarks.measure import Budget, Case

ALL_PEERS: tuple[str, ...] = ("music-triton", "music-torch", "music-reference",
                              "music-reference-compiled", "barlow-twins", "vicreg",
                              "barlow-twins-light", "vicreg-light", "matmul-floor")
#: The peers at equal engineering: MUSIC and the memory-light Barlow Twins and VICReg beside
#: the official (materialising) ones, the MUSIC reference and the matmul floor.
BASELINE_PEERS: tuple[str, ...] = ("music-torch", "barlow-twins-light", "vicreg-light",
                                   "barlow-twins", "vicreg", "music-reference", "matmul-floor")
BASELINES_D_SWEEP: tuple[int, ...] = (2000, 4080, 8160, 16320, 32640)
BASELINES_N_SWEEP: tuple[int, ...] = (256, 512, 1024, 2048)
EAGER_PEERS: tuple[str, ...] = tuple(p for p in ALL_PEERS if p != "music-reference-compiled")
MUSIC_AND_FLOOR: tuple[str, ...] = ("music-triton", "music-torch", "music-reference",
                                    "matmul-floor")
FB, FWD = "forward+backward", "forward"
PAPER_N, PAPER_D, K = 2048, 8160, 80
D_SWEEP: tuple[int, ...] = (960, 2000, 4080, 8160, 16320)
N_SWEEP: tuple[int, ...] = (256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Suite:
    """Cases in run order, and the repetition budget per case."""

    name: str
    cases: tuple[Case, ...]
    budget: Budget
    description: str
    #: CPU: cases with ``N * D^2`` above this run the lean protocol (one process, one
    #: warm-up call, ``lean_calls`` timed calls, the first also measuring memory).
    lean_above_nd2: float | None = None
    lean_calls: int = 3
    #: Lean cases with ``N * D^2`` above this skip the warm-up call (calls of a minute).
    cold_above_nd2: float | None = None
    #: Cases whose predicted peak is above this many GiB are skipped with the reason.
    max_predicted_gib: float | None = None

    def is_lean(self, case: Case) -> bool:
        """Whether ``case`` runs the lean protocol."""
        return self.lean_above_nd2 is not None and case.n * case.d**2 > self.lean_above_nd2

    def is_cold(self, case: Case) -> bool:
        """Whether ``case`` runs the lean protocol without a warm-up call."""
        return (self.is_lean(case) and self.cold_above_nd2 is not None
                and case.n * case.d**2 > self.cold_above_nd2)


def _grid(peers: Iterable[str], ns: Iterable[int], ds: Iterable[int], precisions: Iterable[str],
          modes: Iterable[str], k: int = K) -> list[Case]:
    return [Case(p, n, d, k, prec, mode) for prec in precisions for mode in modes
            for n in ns for d in ds for p in peers]


def _unique(cases: Iterable[Case]) -> tuple[Case, ...]:
    seen: dict[Case, None] = {}
    for case in cases:
        seen.setdefault(case)
    return tuple(seen)


def quick_suite() -> Suite:
    cases = (
        # The headline case first: N=512, D=8160, all peers (the CPU goals).
        _grid(ALL_PEERS, [512], [8160], ["ieee"], [FB])
        + _grid(ALL_PEERS, [512], [8160], ["ieee"], [FWD])
        + _grid(EAGER_PEERS, [512], [960, 2000, 4080], ["ieee"], [FB])
        + _grid(["music-reference-compiled"], [512], [2000], ["ieee"], [FB])
        + _grid(EAGER_PEERS, [256, 1024, 2048], [2000], ["ieee"], [FB])
    )
    return Suite("quick", _unique(cases), Budget(warmup_s=0.3, time_s=2.0, min_reps=3,
                                                 max_reps=20),
                 "CPU: D sweep at N=512 (to 8160), forward-only at N=512/D=8160, N sweep at D=2000")


def full_suite(gpu: bool) -> Suite:
    precisions = ["tf32", "bf16"] if gpu else ["ieee"]
    cases = (
        _grid(ALL_PEERS, [PAPER_N], [PAPER_D], precisions, [FB, FWD])
        + _grid(ALL_PEERS, [PAPER_N], D_SWEEP, precisions, [FB])
        + _grid(ALL_PEERS, N_SWEEP, [PAPER_D], precisions, [FB])
    )
    budget = Budget(0.1, 0.3, 5, 200) if gpu else Budget(1.0, 5.0, 3, 20)
    return Suite("full", _unique(cases), budget,
                 "sweeps: D sweep at N=2048, N sweep at D=8160, every peer")


def gpu_core_suite() -> Suite:
    precisions = ["tf32", "bf16"]
    cases = (
        _grid(ALL_PEERS, [PAPER_N], [PAPER_D], precisions, [FB, FWD])
        + _grid(EAGER_PEERS, [PAPER_N], D_SWEEP, precisions, [FB])
        + _grid(EAGER_PEERS, N_SWEEP, [PAPER_D], precisions, [FB])
        + _grid(MUSIC_AND_FLOOR, [PAPER_N], [PAPER_D], ["ieee"], [FB])
    )
    return Suite("gpu-core", _unique(cases), Budget(warmup_s=0.05, time_s=0.25, min_reps=5,
                                                    max_reps=100),
                 "CUDA: tf32+bf16 D sweep at N=2048, N sweep at D=8160, compile at the paper's "
                 "shape, ieee at the paper's shape")


def gpu_headline_suite() -> Suite:
    cases = _grid(ALL_PEERS, [PAPER_N], [PAPER_D], ["tf32", "bf16"], [FB])
    return Suite("gpu-headline", tuple(cases), Budget(warmup_s=0.05, time_s=0.25, min_reps=5,
                                                      max_reps=100),
                 "CUDA: the paper's shape (N=2048, D=8160, K=80), every peer, tf32 and bf16")


def headline_suite() -> Suite:
    cases = _grid(ALL_PEERS, [512], [8160], ["ieee"], [FB])
    return Suite("headline", tuple(cases), Budget(warmup_s=0.3, time_s=2.0, min_reps=3,
                                                  max_reps=20),
                 "CPU: the CPU case alone (N=512, D=8160, forward+backward), a replicate")


def baselines_suite() -> Suite:
    """MUSIC beside memory-light and official Barlow Twins and VICReg (CPU, about 35 minutes
    on 2 idle cores): D sweep at N=512 up to D=32640, N sweep at D=8160.

    Every case runs the lean protocol (one process: a warm-up call, then 3 timed calls, the
    first also measuring memory; no warm-up at D=32640, where a call takes a minute), in this
    order: D sweep to 16320, D=8192 (Barlow Twins and VICReg pairs), D=32640, N sweep."""
    d_small = [d for d in BASELINES_D_SWEEP if d <= 16320]
    d_large = [d for d in BASELINES_D_SWEEP if d > 16320]
    # D=8192 (the width users report running out of memory at) for the Barlow Twins and
    # VICReg pairs only: MUSIC needs D divisible by K=80.
    pairs_only = [p for p in BASELINE_PEERS if "barlow" in p or "vicreg" in p]
    cases = (_grid(BASELINE_PEERS, [512], d_small, ["ieee"], [FB])
             + _grid(pairs_only, [512], [8192], ["ieee"], [FB])
             + _grid(BASELINE_PEERS, [512], d_large, ["ieee"], [FB])
             + _grid(BASELINE_PEERS, BASELINES_N_SWEEP, [PAPER_D], ["ieee"], [FB]))
    return Suite("baselines", _unique(cases),
                 Budget(warmup_s=0.3, time_s=2.0, min_reps=3, max_reps=10),
                 "CPU: peers at equal engineering, D sweep at N=512 (to 32640), N sweep at "
                 "D=8160", lean_above_nd2=0, lean_calls=3, cold_above_nd2=512 * 16320**2,
                 max_predicted_gib=20.0)


def baselines_smoke_suite() -> Suite:
    cases = _grid(BASELINE_PEERS, [32], [160, 320], ["ieee"], [FB])
    return Suite("baselines-smoke", _unique(cases), Budget(0.0, 0.0, 3, 3),
                 "tiny shapes of the baselines suite, for tests", lean_above_nd2=0,
                 lean_calls=3, cold_above_nd2=32 * 160**2, max_predicted_gib=20.0)


def smoke_suite() -> Suite:
    cases = _grid(ALL_PEERS, [32], [160, 240], ["ieee"], [FB]) + _grid(
        ALL_PEERS, [32], [240], ["ieee"], [FWD])
    return Suite("smoke", _unique(cases), Budget(0.0, 0.0, 3, 3), "tiny shapes, for tests")


def get_suite(name: str, gpu: bool) -> Suite:
    """The suite called ``name`` (``quick``, ``full``, ``gpu-core``, ``smoke``)."""
    if name == "quick":
        return quick_suite()
    if name == "full":
        return full_suite(gpu)
    if name == "gpu-core":
        return gpu_core_suite()
    if name == "smoke":
        return smoke_suite()
    if name == "headline":
        return headline_suite()
    if name == "gpu-headline":
        return gpu_headline_suite()
    if name == "baselines":
        return baselines_suite()
    if name == "baselines-smoke":
        return baselines_smoke_suite()
    raise ValueError(f"unknown suite {name!r}; choose quick, full, gpu-core, gpu-headline, "
                     "headline, baselines or smoke")
