"""The ``distributed`` suite: per-rank cost of the loss under ``gather_distributed=True``,
sharded and unsharded, for W = 1, 2, 4 ranks at one global batch.

Usage::

    python -m benchmarks.run --suite distributed              # CPU: gloo, 1 thread per rank
    python -m benchmarks.run --suite distributed --device cuda  # NCCL, one GPU per rank

Per rank and per step (forward + backward of the loss on the gathered views, inputs given):

* FLOPs, counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the ``torch`` backend
  (the matrix products; elementwise work is not counted): ``6 N D |A_r|`` when rank ``r`` owns
  the rows ``A_r`` of ``P``, ``6 N D^2`` unsharded. Exact counts, whatever the machine.
* The collectives, counted by :class:`torch.distributed.tensor.debug.CommDebugMode`, and their
  payload in bytes: the all-gather's output (``N x 2D``), the reduce-scatter's input (same
  size) and, sharded, the all-reduce of the 2 partial entropy sums. Exact.
* Time: median over steps of the slowest rank's forward+backward (ranks start together after
  a barrier). On a CPU shared by more processes than cores, ranks compete for cores: W ranks
  on C < W cores cannot show a 1/W time, and the load average is recorded with the results.

On CUDA the timed backend is ``auto`` (Triton) and the FLOPs are still counted on the
``torch`` backend (the counter does not see Triton kernels); W runs up to the GPU count.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import hardware

GLOBAL_N, D, K = 512, 8160, 80
WORLDS: tuple[int, ...] = (1, 2, 4)
WARMUP_STEPS, TIMED_STEPS = 1, 5


def _flop_count(step: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_flops(c: Any, a: Any, b: Any, *args: Any, **kwargs: Any) -> int:
        return 2 * a[0] * a[1] * b[1]

    # The torch backend accumulates its gradient products in place (``addmm_``), which
    # FlopCounterMode's registry (torch 2.14) does not list: count it as ``addmm`` does.
    in_place = {torch.ops.aten.addmm_: addmm_flops}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        step()
    return int(counter.get_total_flops())


def _collectives(step: Any) -> dict[str, int]:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        step()
    return {str(op).split(".")[-1]: int(n) for op, n in comm.get_comm_counts().items()}


def _worker(rank: int, world: int, init_file: str, out_dir: str, device_type: str,
            shard: bool, n: int, d: int, k: int) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world)
    from music_loss import MUSICLoss

    gen = torch.Generator().manual_seed(rank)
    rows = n // world
    z1 = torch.randn(rows, d, generator=gen).to(device).requires_grad_()
    z2 = (torch.randn(rows, d, generator=gen).to(device) + z1.detach()).requires_grad_()

    def make_step(backend: str) -> Any:
        loss_fn = MUSICLoss(k, gather_distributed=True, shard=shard, backend=backend,
                            precision="ieee" if device.type == "cpu" else "auto")

        def step() -> None:
            z1.grad = z2.grad = None
            loss_fn(z1, z2).backward()

        return step

    counted = make_step("torch")
    flops = _flop_count(counted)
    collectives = _collectives(counted)
    timed = make_step("torch" if device.type == "cpu" else "auto")
    times = []
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        timed()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    record = {"rank": rank, "flops": flops, "collectives": collectives, "times_s": times}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def payload_bytes(n: int, d: int, shard: bool, itemsize: int = 4) -> dict[str, int]:
    """Bytes of each collective's buffer per step (the same on every rank).

    Example:
        >>> payload_bytes(512, 8160, True)["all_gather"]
        33423360
    """
    both_views = n * 2 * d * itemsize
    out = {"all_gather": both_views, "reduce_scatter": both_views}
    if shard:
        out["all_reduce"] = 2 * itemsize
    return out


def run_case(world: int, shard: bool, device_type: str, n: int = GLOBAL_N, d: int = D,
             k: int = K) -> dict[str, Any]:
    """Spawn ``world`` ranks, measure, and return the case's record."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, device_type, shard,
                                n, d, k), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    slowest = [max(step) for step in zip(*(r["times_s"] for r in ranks))]
    payload = payload_bytes(n, d, shard)
    ring = 2 * (world - 1) / world * payload["all_gather"]  # bytes each rank sends (ring)
    return {
        "world": world, "shard": shard, "n_global": n, "d": d, "k": k,
        "flops_per_rank": [r["flops"] for r in ranks],
        "flops_expected_max": 6 * n * d * _max_owned_rows(d, k, world, shard),
        "collectives_per_rank": [r["collectives"] for r in ranks],
        "payload_bytes": payload,
        "ring_bytes_sent_per_rank": int(ring) if world > 1 else 0,
        "step_s_median": statistics.median(slowest),
        "step_s_all": slowest,
        "load_average": hardware.load_average(),
    }


def _max_owned_rows(d: int, k: int, world: int, shard: bool) -> int:
    from music_loss.distributed import owned_segments

    if not shard:
        return d
    return max(s1 - s0 for s0, s1 in (owned_segments(d // k, r, world)
                                      for r in range(world))) * k


def run_suite(device: torch.device, out: str | Path) -> Path:
    """Run every (W, shard) case and write ``<slug>-distributed.json``, ``.md`` and ``.png``."""
    worlds = WORLDS
    if device.type == "cuda":
        worlds = tuple(w for w in (1, 2, 4, 8) if w <= torch.cuda.device_count())
    meta = hardware.collect_meta(device, "distributed")
    meta["suite_description"] = (f"gather_distributed=True, N={GLOBAL_N} global, D={D}, K={K}, "
                                 f"W in {list(worlds)}, sharded and unsharded; "
                                 + ("gloo, 1 thread per rank" if device.type == "cpu"
                                    else "NCCL, one GPU per rank"))
    meta["cpu_count"] = os.cpu_count()
    records = []
    for world in worlds:
        for shard in (False, True):
            print(f"W={world} shard={shard} ...", flush=True)
            records.append(run_case(world, shard, device.type))
            print(f"  {records[-1]['step_s_median']:.3f} s/step, "
                  f"{max(records[-1]['flops_per_rank']) / 1e9:.1f} GFLOP/rank", flush=True)
    meta["load_average_end"] = hardware.load_average()
    meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = Path(out)
    date = meta["date"][:10]
    path = (out if out.suffix == ".json"
            else out / f"{hardware.device_slug(device)}-{date}-distributed.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    render(path)
    return path


def render(path: str | Path) -> tuple[Path, Path]:
    """Write the markdown table and the PNG next to a results file."""
    path = Path(path)
    data = json.loads(path.read_text())
    meta, records = data["meta"], data["records"]
    md = path.with_suffix(".md")
    md.write_text("\n".join(markdown_lines(meta, records)) + "\n")
    png = path.with_suffix(".png")
    _plot(meta, records, png)
    return md, png


def markdown_lines(meta: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    base = {r["shard"]: r["step_s_median"] for r in records if r["world"] == 1}
    lines = [
        f"# Distributed suite: {meta['device']}",
        "",
        f"{meta['suite_description']}. {meta['date']}; torch {meta['torch']}, music-loss "
        f"{meta['music_loss']} (git {meta['git_sha']}); load average {meta['load_average_start']}"
        f" at start, {meta['load_average_end']} at end (1/5/15 min).",
        "",
        "Per rank and step, forward+backward of the loss on the gathered views. FLOPs: "
        "`FlopCounterMode` on the `torch` backend (matrix products), max over ranks, exact. "
        "Bytes: payload of each collective (all-gather output, reduce-scatter input, "
        "all-reduce), exact; ring traffic sent per rank = 2 (W-1)/W x all-gather payload. "
        "Time: median over steps of the slowest rank, ratio against W=1 of the same mode.",
        "",
        "| W | mode | GFLOP/rank (max) | / 6ND^2 | expected | collectives per step "
        "| payload bytes | ring bytes sent/rank | step s (median) | time / W=1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = 6 * GLOBAL_N * D * D
    for r in records:
        flops = max(r["flops_per_rank"])
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(r["collectives_per_rank"][0].items()))
        payload = ", ".join(f"{k} {v:,}" for k, v in r["payload_bytes"].items())
        lines.append(
            f"| {r['world']} | {'sharded' if r['shard'] else 'unsharded'} | {flops / 1e9:.1f} "
            f"| {flops / full:.3f} | {r['flops_expected_max'] / 1e9:.1f} | {calls or '-'} "
            f"| {payload} | {r['ring_bytes_sent_per_rank']:,} | {r['step_s_median']:.3f} "
            f"| {r['step_s_median'] / base[r['shard']]:.2f} |")
    by_mode = {(r["world"], r["shard"]): r["step_s_median"] for r in records}
    lines.append("")
    for world in sorted({r["world"] for r in records}):
        if (world, True) in by_mode and (world, False) in by_mode:
            lines.append(f"- W={world}: sharded / unsharded step time "
                         f"{by_mode[(world, True)] / by_mode[(world, False)]:.2f} (same run).")
    cores = meta.get("cpu_count") or 0
    if meta["device_type"] == "cpu" and cores < max(r["world"] for r in records):
        lines += ["", f"W ranks of one thread each share {cores} cores (and the machine is "
                  "shared with other processes, see the load average): with W > cores the "
                  "ranks time-share, so the time cannot fall as 1/W even when the work per rank "
                  "does; the FLOP and byte columns are exact."]
    return lines


def _plot(meta: dict[str, Any], records: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_flops, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for shard, color, marker in ((False, "#7f7f7f", "s"), (True, "#d62728", "o")):
        rows = sorted((r for r in records if r["shard"] == shard), key=lambda r: r["world"])
        worlds = [r["world"] for r in rows]
        label = "sharded" if shard else "unsharded"
        ax_flops.plot(worlds, [max(r["flops_per_rank"]) / 1e9 for r in rows], marker=marker,
                      color=color, label=label)
        ax_time.plot(worlds, [r["step_s_median"] for r in rows], marker=marker, color=color,
                     label=label)
    worlds = sorted({r["world"] for r in records})
    full = 6 * GLOBAL_N * D * D / 1e9
    ax_flops.plot(worlds, [full / w for w in worlds], ":", color="black", label="6ND²/W")
    ax_flops.set(xlabel="ranks W", ylabel="GFLOP per rank per step", xscale="log",
                 yscale="log", title="loss FLOPs per rank (exact)")
    ticks = sorted({max(r["flops_per_rank"]) / 1e9 for r in records})
    ax_flops.set_yticks(ticks, [f"{t:.0f}" for t in ticks])
    ax_time.set(xlabel="ranks W", ylabel="s per step (slowest rank, median)", xscale="log",
                title=f"time ({meta.get('cpu_count')} cores, load {meta['load_average_start'][0]})")
    for ax in (ax_flops, ax_time):
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MUSIC loss, gather_distributed, N={GLOBAL_N} global, D={D}, K={K}: "
                 f"{meta['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # re-render: python -m benchmarks.distributed results.json
    import sys

    for results in sys.argv[1:]:
        print(*render(results))
