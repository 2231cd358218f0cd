"""Peers at equal engineering: MUSIC beside memory-light and official Barlow Twins and VICReg.

Usage::

    python -m benchmarks.baselines_sweep run --out benchmarks/results/   # CPU, ~35 minutes
    python -m benchmarks.baselines_sweep render benchmarks/results/cpu-<date>-baselines.json

``run`` measures the ``baselines`` suite (forward+backward, float32, N=512 over D in
{2000, ..., 32640}, and D=8160 over N in {256, ..., 2048}) with ``benchmarks.run``: each
peer first checked against float64, each case in a fresh process, cases predicted to need
more than 20 GiB skipped with the prediction recorded, each measured by the lean protocol
(one warm-up call, none at D=32640; three timed calls, the first also measuring memory).
``render`` writes the markdown page (tables, fitted growth exponents, memory ratios) and the
plots (``-d.png``: over D, ``-n.png``: over N) beside the results file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import hardware
from benchmarks.render import STYLE
from benchmarks.suites import BASELINE_PEERS, PAPER_D

D_SWEEP_N = 512
#: Pairs (memory-light, official) whose memory ratio the page reports.
PAIRS: tuple[tuple[str, str], ...] = (("barlow-twins-light", "barlow-twins"),
                                      ("vicreg-light", "vicreg"),
                                      ("music-torch", "music-reference"))
SHARED_NOTE = ("The machine (2 cores, 24 GiB) was shared with three other jobs during the run "
               "and the benchmark ran under `nice -n 10`: absolute times are slower and noisier "
               "than on an idle machine; the methods ran interleaved, case by case, so their "
               "ratios at one shape are comparable.")


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``None`` under 2 points).

    Example:
        >>> round(fit_exponent([1, 2, 4], [3, 12, 48]), 6)
        2.0
    """
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def _ok(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "ok" and r["mode"] == "forward+backward"]


def sweep_axes(records: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """``(N of the D sweep, D of the N sweep)``: the values shared by the most cases
    (512 and 8160 in the ``baselines`` suite)."""
    def most_common(key: str, other: str, default: int) -> int:
        spread: dict[int, set[int]] = {}
        for r in records:
            spread.setdefault(r[key], set()).add(r[other])
        return max(spread, key=lambda v: (len(spread[v]), v == default)) if spread else default

    return most_common("n", "d", D_SWEEP_N), most_common("d", "n", PAPER_D)


def d_sweep(records: Sequence[dict[str, Any]], method: str, n0: int = D_SWEEP_N
            ) -> list[dict[str, Any]]:
    return sorted((r for r in _ok(records) if r["method"] == method and r["n"] == n0),
                  key=lambda r: r["d"])


def n_sweep(records: Sequence[dict[str, Any]], method: str, d0: int = PAPER_D
            ) -> list[dict[str, Any]]:
    return sorted((r for r in _ok(records) if r["method"] == method and r["d"] == d0),
                  key=lambda r: r["n"])


def exponents(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: time ~ D^a and memory ~ D^b over the D sweep, ~ N^c, N^e over the N sweep."""
    n0, d0 = sweep_axes(records)
    out: dict[str, dict[str, Any]] = {}
    for method in _methods(records):
        rows, nrows = d_sweep(records, method, n0), n_sweep(records, method, d0)
        out[method] = {
            "time_vs_d": fit_exponent([r["d"] for r in rows], [r["median_ms"] for r in rows]),
            "memory_vs_d": fit_exponent([r["d"] for r in rows],
                                        [r["peak_extra_mib"] for r in rows]),
            "d_range": [rows[0]["d"], rows[-1]["d"]] if rows else None,
            "time_vs_n": fit_exponent([r["n"] for r in nrows], [r["median_ms"] for r in nrows]),
            "memory_vs_n": fit_exponent([r["n"] for r in nrows],
                                        [r["peak_extra_mib"] for r in nrows]),
        }
    return out


def _methods(records: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["method"] for r in records}
    return [m for m in BASELINE_PEERS if m in present]


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def _cell(rows: Sequence[dict[str, Any]], value: int, records: Sequence[dict[str, Any]],
          method: str, axis: str, fixed: int) -> tuple[str, str]:
    hit = next((r for r in rows if r[axis] == value), None)
    if hit is None:
        other = next((r for r in records if r["method"] == method and r[axis] == value
                      and (r["n"] if axis == "d" else r["d"]) == fixed), None)
        why = "skipped" if other and other["status"].startswith("skipped") else (
            "failed" if other else "–")
        return why, why
    t = f"{_fmt(hit['median_ms'])} [{_fmt(hit['p20_ms'])}, {_fmt(hit['p80_ms'])}]"
    t += f" ({hit.get('repeats')} calls{'' if hit.get('warm_up', True) else ', cold'})"
    return t, _fmt(hit["peak_extra_mib"])


def _sweep_table(records: Sequence[dict[str, Any]], axis: str, values: Sequence[int],
                 fixed: int) -> list[str]:
    head = "D" if axis == "d" else "N"
    lines = [f"| method | {head} | median ms [p20, p80] | peak extra MiB |", "|---|---|---|---|"]
    for method in _methods(records):
        rows = (d_sweep(records, method, fixed) if axis == "d"
                else n_sweep(records, method, fixed))
        for value in values:
            t, m = _cell(rows, value, records, method, axis, fixed)
            lines.append(f"| {method} | {value} | {t} | {m} |")
    return lines


def render_markdown(meta: dict[str, Any], records: Sequence[dict[str, Any]],
                    plots: Sequence[str]) -> str:
    n0, d0 = sweep_axes(records)
    ds = sorted({r["d"] for r in records if r["n"] == n0})
    ns = sorted({r["n"] for r in records if r["d"] == d0})
    exps = exponents(records)
    lines = [
        f"# Peers at equal engineering: {meta.get('device')}", "",
        f"Run on {meta.get('date')}; torch {meta.get('torch')}, music-loss "
        f"{meta.get('music_loss')} (git {meta.get('git_sha')}), {meta.get('torch_threads')} "
        f"torch threads; load average {meta.get('load_average_start')} at start, "
        f"{meta.get('load_average_end')} at end.", "",
        meta.get("machine_note", ""), "",
        "Forward+backward of each loss on float32 views, time of single calls (median and "
        "20th/80th percentiles) and peak resident memory above the inputs and their gradient "
        "buffers. Lean protocol: each case in a fresh process, one warm-up call (none at the "
        "largest D, where a call takes a minute), then the number of timed calls shown, the "
        "first of them also measuring memory. "
        "Every method was first checked against its formula in float64; a case predicted to "
        "need more than 20 GiB was skipped. Methods:", "",
        *[f"- `{name}`: {desc}" for name, desc in meta.get("peers", {}).items()], "",
        f"## Over D at N={n0}", "", *_sweep_table(records, "d", ds, n0), "",
        f"## Over N at D={d0}", "", *_sweep_table(records, "n", ns, d0), "",
        "## Growth exponents (least squares in log-log)", "",
        "| method | time ~ D^a | memory ~ D^b | D range | time ~ N^c | memory ~ N^e |",
        "|---|---|---|---|---|---|",
    ]
    for method, e in exps.items():
        rng = f"{e['d_range'][0]}–{e['d_range'][1]}" if e["d_range"] else "–"
        lines.append(f"| {method} | {_fmt(e['time_vs_d'])} | {_fmt(e['memory_vs_d'])} | {rng} "
                     f"| {_fmt(e['time_vs_n'])} | {_fmt(e['memory_vs_n'])} |")
    lines += ["", f"## Memory-light / materialising at N={n0}", "",
              "| pair | D | time ratio | peak extra memory ratio |", "|---|---|---|---|"]
    for light, official in PAIRS:
        a = d_sweep(records, light, n0)
        b = {r["d"]: r for r in d_sweep(records, official, n0)}
        for r in a:
            if r["d"] in b:
                o = b[r["d"]]
                mem = (f"{r['peak_extra_mib'] / o['peak_extra_mib']:.3g}"
                       if o["peak_extra_mib"] and r["peak_extra_mib"] is not None else "–")
                lines.append(f"| `{light}` / `{official}` | {r['d']} | "
                             f"{r['median_ms'] / o['median_ms']:.3g} | {mem} |")
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def render_plots(records: Sequence[dict[str, Any]], stem: Path) -> list[str]:
    """Time and memory over D (N=512) and over N (D=8160), log-log; the files' names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    n0, d0 = sweep_axes(records)
    for axis, fixed, label in (("d", n0, f"D (N={n0})"), ("n", d0, f"N (D={d0})")):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
        for method in _methods(records):
            rows = (d_sweep(records, method, fixed) if axis == "d"
                    else n_sweep(records, method, fixed))
            if not rows:
                continue
            color, marker, style = STYLE.get(method, ("k", "o", "-"))
            for ax, key, scale in ((ax_t, "median_ms", 1e-3), (ax_m, "peak_extra_mib", 1.0)):
                pts = [(r[axis], r[key] * scale) for r in rows if r[key] and r[key] > 0]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], color=color,
                            marker=marker, linestyle=style, label=method)
        for ax, ylabel in ((ax_t, "forward+backward, median s"), (ax_m, "peak extra MiB")):
            if ax.lines:  # log axes need data
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        if ax_m.lines:
            ax_m.legend(fontsize=8)
        fig.suptitle("MUSIC, Barlow Twins and VICReg: memory-light and materialising (CPU, "
                     "float32)")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        names.append(path.name)
    return names


def render(path: Path, plots: bool = True) -> Path:
    """Write ``<stem>.md`` (and ``<stem>-d.png``, ``<stem>-n.png``) beside ``path``."""
    data = json.loads(path.read_text())
    stem = path.with_suffix("")
    names = render_plots(data["records"], stem) if plots else []
    md = stem.with_suffix(".md")
    md.write_text(render_markdown(data["meta"], data["records"], names))
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines_sweep",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="measure the baselines suite, then render it")
    run_p.add_argument("--out", default="benchmarks/results/",
                       help="folder (file cpu-<date>-baselines.json) or a .json path")
    run_p.add_argument("--suite", default="baselines", choices=["baselines", "baselines-smoke"])
    run_p.add_argument("--shared", action="store_true",
                       help="record that the machine was shared with other jobs")
    run_p.add_argument("--resume", action="store_true")
    run_p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    run_p.add_argument("--no-plots", action="store_true")
    ren_p = sub.add_parser("render", help="tables, exponents and plots of a results file")
    ren_p.add_argument("path")
    ren_p.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "render":
        print(f"wrote {render(Path(args.path), plots=not args.no_plots)}")
        return
    from benchmarks.run import run_benchmarks

    device = torch.device("cpu")
    out = Path(args.out)
    if out.suffix != ".json":
        date = _dt.date.today().isoformat()
        out = out / f"{hardware.device_slug(device)}-{date}-{args.suite}.json"
    extra = {"machine_note": SHARED_NOTE} if args.shared else {}
    path = run_benchmarks(device, args.suite, str(out), resume=args.resume,
                          subprocess_per_case=False if args.in_process else None,
                          extra_meta=extra)
    print(f"wrote {path} and {render(path, plots=not args.no_plots)}")


if __name__ == "__main__":
    main()
