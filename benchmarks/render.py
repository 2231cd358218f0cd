"""Render benchmark results files into a markdown table and PNG plots.

Usage::

    python -m benchmarks.render benchmarks/results/cpu-2026-11-25.json [more.json ...]
        [--out-dir DIR] [--no-plots]

Writes ``<stem>.md`` (headline case, every case, what was not measured and why) and, for
each sweep, ``<stem>-<mode>-<precision>-n<N>-vs-d.png`` / ``...-d<D>-vs-n.png``: time and
peak extra memory against D (or N), log scales, one line per peer. Several files (e.g. a GPU
suite run in two halves) are merged; the first file's ``meta`` heads the page.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

METHOD_ORDER: tuple[str, ...] = ("music-triton", "music-torch", "music-reference",
                                 "music-reference-compiled", "barlow-twins", "vicreg",
                                 "barlow-twins-light", "vicreg-light", "matmul-floor")
STYLE: dict[str, tuple[str, str, str]] = {  # color, marker, line style
    "music-triton": ("#d62728", "o", "-"),
    "music-torch": ("#1f77b4", "s", "-"),
    "music-reference": ("#2ca02c", "^", "-"),
    "music-reference-compiled": ("#98df8a", "v", "--"),
    "barlow-twins": ("#9467bd", "D", "-."),
    "vicreg": ("#ff7f0e", "P", "-."),
    "barlow-twins-light": ("#9467bd", "d", "-"),
    "vicreg-light": ("#ff7f0e", "p", "-"),
    "matmul-floor": ("#7f7f7f", "x", ":"),
}
MODE_SLUG = {"forward": "fwd", "forward+backward": "fwd-bwd"}
REFERENCE = "music-reference"


def load_results(paths: Sequence[str | Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Meta of the first file and the records of all of them (later files win on a tie)."""
    meta: dict[str, Any] = {}
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for i, path in enumerate(paths):
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "records" not in data or "meta" not in data:
            raise ValueError(f"{path}: not a benchmark results file (needs 'meta' and 'records')")
        if i == 0:
            meta = data["meta"]
        for row in data["records"]:
            merged[_key(row)] = row
    return meta, list(merged.values())


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["method"], row["n"], row["d"], row["segment_dim"], row["precision"], row["mode"])


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status", "ok") == "ok" and row.get("median_ms") is not None


def _order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "–"
    return f"{value / base:.3g}×"


def _case_groups(records: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in records:
        groups[(row["precision"], row["mode"], row["n"], row["d"], row["segment_dim"])].append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: _order(r["method"]))
    return groups


def headline_case(records: Sequence[dict[str, Any]]) -> tuple[Any, ...] | None:
    """The case the README shows: forward+backward at D=8160 with the reference measured,
    N=2048 (the paper's) if present, else N=512, else the largest N; the highest precision
    class first (ieee, then tf32, then bf16)."""
    groups = _case_groups(r for r in records if _ok(r))
    candidates = [key for key, rows in groups.items()
                  if key[1] == "forward+backward" and key[3] == 8160
                  and any(r["method"] == REFERENCE for r in rows)]
    if not candidates:
        return None
    precision_rank = {"ieee": 0, "tf32": 1, "bf16": 2}

    def score(key: tuple[Any, ...]) -> tuple[int, int, int]:
        n = key[2]
        return (0 if n == 2048 else 1 if n == 512 else 2, -n, precision_rank.get(key[0], 3))

    return sorted(candidates, key=score)[0]


def _case_table(rows: list[dict[str, Any]], with_case: bool) -> list[str]:
    ref = next((r for r in rows if r["method"] == REFERENCE and _ok(r)), None)
    ref_ms = ref["median_ms"] if ref else None
    ref_mib = ref["peak_extra_mib"] if ref else None
    head = ("| N | D | " if with_case else "| ") + (
        "method | median ms [p20, p80] | time / reference | peak extra MiB | "
        "memory / reference | TFLOP/s | % of peak |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if not _ok(r):
            continue
        frac = r.get("fraction_of_peak")
        flag = "" if r.get("check_passed", True) else " (float64 check FAILED)"
        cells = [r["method"] + flag,
                 f"{_fmt(r['median_ms'])} [{_fmt(r['p20_ms'])}, {_fmt(r['p80_ms'])}]",
                 _ratio(r["median_ms"], ref_ms),
                 _fmt(r["peak_extra_mib"]),
                 _ratio(r["peak_extra_mib"], ref_mib),
                 _fmt(r.get("tflops")),
                 "–" if frac is None else f"{100 * frac:.1f}%"]
        prefix = [str(r["n"]), str(r["d"])] if with_case else []
        lines.append("| " + " | ".join(prefix + cells) + " |")
    return lines


def headline_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """The headline case's table and the time and memory ratios as sentences."""
    key = headline_case(records)
    if key is None:
        return ["(no forward+backward case at D=8160 with the reference measured)"]
    precision, mode, n, d, k = key
    rows = _case_groups(r for r in records if _ok(r))[key]
    by_method = {r["method"]: r for r in rows}
    lines = [f"**N={n}, D={d}, K={k}, {mode}, precision {precision}** "
             f"(ratios against `{REFERENCE}` in the same run):", ""]
    lines += _case_table(rows, with_case=False)
    ref = by_method[REFERENCE]
    notes = []
    for fast in ("music-triton", "music-torch"):
        if fast in by_method:
            r = by_method[fast]
            time_ratio = r["median_ms"] / ref["median_ms"]
            mem_ratio = (r["peak_extra_mib"] / ref["peak_extra_mib"]
                         if r["peak_extra_mib"] is not None and ref["peak_extra_mib"] else None)
            notes.append(f"- `{fast}` / `{REFERENCE}`: time {time_ratio:.3f} "
                         f"(goal on CPU <= 0.5), peak extra memory "
                         f"{'–' if mem_ratio is None else f'{mem_ratio:.3f}'} (goal <= 0.125).")
    # What a user gets with backend="auto": the Triton kernels on CUDA, else the torch path.
    default = next((by_method[m] for m in ("music-triton", "music-torch") if m in by_method),
                   None)
    for peer in ("barlow-twins", "vicreg", "barlow-twins-light", "vicreg-light",
                 "matmul-floor"):
        if default is not None and peer in by_method:
            p = by_method[peer]
            mem = (f"{default['peak_extra_mib'] / p['peak_extra_mib']:.3g}×"
                   if p["peak_extra_mib"] and default["peak_extra_mib"] is not None else "–")
            notes.append(f"- `{default['method']}` (the `backend='auto'` path here) vs "
                         f"`{peer}`: time {default['median_ms'] / p['median_ms']:.3g}×, "
                         f"peak extra memory {mem}.")
    return [*lines, "", *notes]


def render_markdown(meta: dict[str, Any], records: Sequence[dict[str, Any]],
                    plot_names: Sequence[str] = ()) -> str:
    """The whole results page as markdown."""
    load = (f"load average {meta.get('load_average_start')} at start, "
            f"{meta.get('load_average_end')} at end (1/5/15 min)")
    lines = [
        f"# Benchmark: {meta.get('device', '?')}",
        "",
        f"Suite `{meta.get('suite')}` on {meta.get('date')}; torch {meta.get('torch')}, "
        f"triton {meta.get('triton')}, music-loss {meta.get('music_loss')} "
        f"(git {str(meta.get('git_sha'))[:12]}), {meta.get('torch_threads')} torch threads"
        + (f", driver {meta['driver']}" if meta.get("driver") else "") + f"; {load}.",
        "",
        f"Time: median of single calls after warm-up, with the 20th-80th percentiles. Peak "
        f"extra memory: {meta.get('memory_method', '?')}; the inputs and their gradient "
        "buffers are allocated before and not counted. TFLOP/s count the dense products "
        "each formula needs (MUSIC and Barlow Twins: 2ND² forward, 6ND² forward+backward; "
        "VICReg: 4ND² and 8ND²); % of peak uses the card's dense datasheet peak for the "
        "precision (none on CPU). Every peer was first checked against float64 on a small case.",
        "",
        "## Headline",
        "",
        *headline_lines(records),
        "",
    ]
    if plot_names:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_names] + [""]
    lines += ["## All cases", ""]
    groups = _case_groups(records)
    by_section: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
    for key in groups:
        by_section[(key[0], key[1])].append(key)
    for (precision, mode), keys in sorted(by_section.items()):
        rows = [r for key in sorted(keys, key=lambda k: (k[2], k[3])) for r in groups[key]]
        if not any(_ok(r) for r in rows):
            continue
        lines += [f"### {mode}, precision {precision}", ""]
        for key in sorted(keys, key=lambda k: (k[2], k[3])):
            if any(_ok(r) for r in groups[key]):
                lines += _case_table(groups[key], with_case=True)[0 if key == min(
                    keys, key=lambda k: (k[2], k[3])) else 2:]
        lines.append("")
    missing: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in records:
        if not _ok(r):
            missing[(r["method"], r.get("status", "?"))].append(
                f"N={r['n']} D={r['d']} {r['precision']} {r['mode']}")
    if missing:
        lines += ["## Not measured", ""]
        for (method, status), cases in sorted(missing.items(), key=lambda x: _order(x[0][0])):
            lines.append(f"- `{method}`: {status} ({len(cases)} case"
                         f"{'s' if len(cases) != 1 else ''}: {', '.join(cases[:4])}"
                         f"{', ...' if len(cases) > 4 else ''})")
        lines.append("")
    return "\n".join(lines)


def _sweeps(records: Sequence[dict[str, Any]], axis: str
            ) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Groups of ok records that vary only along ``axis`` ('d' or 'n'), with >= 2 values."""
    fixed = "n" if axis == "d" else "d"
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if _ok(r):
            groups[(r["precision"], r["mode"], r[fixed], r["segment_dim"])].append(r)
    return {key: rows for key, rows in groups.items()
            if len({r[axis] for r in rows}) >= 2}


def render_plots(meta: dict[str, Any], records: Sequence[dict[str, Any]], out_dir: Path,
                 stem: str) -> list[str]:
    """Write one PNG per sweep (time and memory against D or N); return the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    names = []
    device = meta.get("device", "?")
    for axis in ("d", "n"):
        for (precision, mode, fixed_value, k), rows in sorted(_sweeps(records, axis).items()):
            fixed = "N" if axis == "d" else "D"
            fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 5.4))
            by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in rows:
                by_method[r["method"]].append(r)
            for method in sorted(by_method, key=_order):
                pts = sorted(by_method[method], key=lambda r: r[axis])
                color, marker, style = STYLE.get(method, ("black", ".", "-"))
                kw = {"color": color, "marker": marker, "linestyle": style, "label": method,
                      "linewidth": 1.6, "markersize": 6}
                ax_time.plot([r[axis] for r in pts], [r["median_ms"] for r in pts], **kw)
                mem = [(r[axis], r["peak_extra_mib"]) for r in pts
                       if r["peak_extra_mib"] is not None and r["peak_extra_mib"] > 0]
                if mem:
                    ax_mem.plot([x for x, _ in mem], [y for _, y in mem], **kw)
            label = "feature dimension D" if axis == "d" else "batch size N"
            for ax, ylabel in ((ax_time, "time per call, median (ms)"),
                               (ax_mem, "peak extra memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(f"{label} (log scale)")
                ax.set_ylabel(f"{ylabel}, log scale")
                values = sorted({r[axis] for r in rows})
                ax.set_xticks(values)
                ax.set_xticklabels([str(v) for v in values])
                # Ticks at 1-2-5 of each decade, printed plainly: readable over short spans.
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.minorticks_off()
                ax.grid(True, which="major", alpha=0.3)
            ax_time.set_title("time (lower is better)")
            ax_mem.set_title("peak extra memory (lower is better)")
            handles, labels = ax_time.get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)),
                       fontsize=9, frameon=False)
            fig.suptitle(f"{device}: {mode}, {fixed}={fixed_value}, K={k}, precision {precision}",
                         fontsize=11)
            fig.tight_layout(rect=(0, 0.1, 1, 1))
            name = f"{stem}-{MODE_SLUG.get(mode, mode)}-{precision}-" + (
                f"n{fixed_value}-vs-d.png" if axis == "d" else f"d{fixed_value}-vs-n.png")
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            names.append(name)
    return names


def render(paths: Sequence[str | Path], out_dir: str | Path | None = None,
           plots: bool = True) -> Path:
    """Render results files to ``<stem>.md`` (and PNGs) in ``out_dir``; return the md path.

    Example:
        >>> render(["benchmarks/results/cpu-2026-11-25.json"])  # doctest: +SKIP
        PosixPath('benchmarks/results/cpu-2026-11-25.md')
    """
    if not paths:
        raise ValueError("give at least one results .json file")
    meta, records = load_results(paths)
    first = Path(paths[0])
    target = Path(out_dir) if out_dir is not None else first.parent
    target.mkdir(parents=True, exist_ok=True)
    names = render_plots(meta, records, target, first.stem) if plots else []
    md_path = target / f"{first.stem}.md"
    md_path.write_text(render_markdown(meta, records, names) + "\n")
    return md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results .json file(s) from benchmarks.run")
    parser.add_argument("--out-dir", default=None, help="where to write (default: beside the "
                        "first results file)")
    parser.add_argument("--no-plots", action="store_true", help="markdown only")
    args = parser.parse_args(argv)
    md_path = render(args.results, args.out_dir, plots=not args.no_plots)
    print(f"wrote {md_path}")
    print(md_path.read_text().split("## Plots")[0].split("## All cases")[0])


if __name__ == "__main__":
    main()
