"""Tables (Markdown) and plots (PNG) from a results JSON of the digits study.

Re-render without retraining: ``python -m benchmarks.quality.report
benchmarks/results/quality-digits.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality.train import BASELINES, METHODS

LABELS: dict[str, str] = {**METHODS, **BASELINES}
ACCURACIES: tuple[tuple[str, str], ...] = (
    ("linear_probe_acc", "linear probe (all labels)"),
    ("linear_probe_few_acc", "linear probe (5 labels/class)"),
    ("knn_acc", "k-NN (k=5, cosine)"),
)
# A difference smaller than this many accuracy points per seed is called a tie.
TIE_POINTS = 0.5


def select(records: Iterable[dict[str, Any]], study: str, **match: Any) -> list[dict[str, Any]]:
    """Records of ``study`` whose fields equal ``match``."""
    return [r for r in records
            if study in r["studies"] and all(r.get(k) == v for k, v in match.items())]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt(values: Sequence[float]) -> str:
    """``mean +- std`` in percent."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def method_order(records: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["method"] for r in records}
    return [m for m in LABELS if m in present]


def main_table(records: Sequence[dict[str, Any]]) -> list[str]:
    rows = select(records, "main")
    lines = ["| method | D | K | seeds | " + " | ".join(name for _, name in ACCURACIES)
             + " | train s |",
             "|---|---|---|---|" + "---|" * len(ACCURACIES) + "---|"]
    for method in method_order(rows):
        group = [r for r in rows if r["method"] == method]
        seconds = np.mean([r.get("train_seconds", 0.0) for r in group])
        k = group[0]["segment_dim"]
        lines.append(f"| {LABELS[method]} | {group[0]['d']} | {k if k else '-'} | {len(group)} | "
                     + " | ".join(fmt([r[key] for r in group]) for key, _ in ACCURACIES)
                     + f" | {seconds:.0f} |")
    return lines


def sweep_table(records: Sequence[dict[str, Any]], study: str, field: str,
                methods: Sequence[str]) -> list[str]:
    rows = select(records, study)
    values = sorted({r[field] for r in rows})
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    header = f"| {field} | " + " | ".join(
        f"{LABELS[m]}: {name}" for m in methods for _, name in ACCURACIES) + " |"
    lines = [header, "|---|" + "---|" * (len(methods) * len(ACCURACIES))]
    for value in values:
        cells = []
        for m in methods:
            group = [r for r in rows if r["method"] == m and r[field] == value]
            cells += [fmt([r[key] for r in group]) for key, _ in ACCURACIES]
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return lines


def paired(records: Sequence[dict[str, Any]], study: str, better: dict[str, Any],
           worse: dict[str, Any], key: str) -> tuple[float, float, int, int]:
    """Mean and std over seeds of ``better - worse`` (same seed), wins and ties of ``better``."""
    a = {r["seed"]: r[key] for r in select(records, study, **better)}
    b = {r["seed"]: r[key] for r in select(records, study, **worse)}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return float("nan"), float("nan"), 0, 0
    diffs = [100 * (a[s] - b[s]) for s in seeds]
    mean, std = mean_std(diffs)
    wins = sum(d > TIE_POINTS for d in diffs)
    ties = sum(abs(d) <= TIE_POINTS for d in diffs)
    return mean, std, wins, ties


def verdict(mean: float, std: float, n: int, strict: bool) -> str:
    """Whether ``better > worse`` (``strict``) or ``better >= worse`` holds over the seeds."""
    if n == 0 or not np.isfinite(mean):
        return "not measured"
    if abs(mean) <= TIE_POINTS:
        return "tie: does not hold" if strict else "tie: holds"
    # The difference counts when it exceeds its own seed-to-seed spread.
    if mean > 0:
        return "holds" if mean > std else "holds weakly (within seed spread)"
    return "reversed" if -mean > std else "reversed weakly (within seed spread)"


def ordering_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| claim (paper) | setting | metric | better - worse (points, mean ± std over "
             "seeds) | seeds won / tied | verdict |", "|---|---|---|---|---|---|"]

    def add(claim: str, setting: str, study: str, better: dict[str, Any],
            worse: dict[str, Any]) -> None:
        strict = " > " in claim
        for key, name in ACCURACIES:
            seeds = len(select(records, study, **better))
            mean, std, wins, ties = paired(records, study, better, worse, key)
            lines.append(f"| {claim} | {setting} | {name} | {mean:+.1f} ± {std:.1f} | "
                         f"{wins}/{ties} of {seeds} | {verdict(mean, std, seeds, strict)} |")

    main = select(records, "main", method="music_blocks")
    if main:
        d, k = main[0]["d"], main[0]["segment_dim"]
        add("entropy + invariance > entropy only (Table 6)", f"D={d}, K={k}", "main",
            {"method": "music_blocks"}, {"method": "music_entropy_only"})
        add("MUSIC >= VICReg at equal D (Tables 1, 8)", f"D={d}, K={k}", "main",
            {"method": "music_blocks"}, {"method": "vicreg"})
        add("MUSIC >= Barlow Twins (Table 1)", f"D={d}, K={k}", "main",
            {"method": "music_blocks"}, {"method": "barlow_twins"})
    for d in sorted({r["d"] for r in select(records, "dim")}):
        add("MUSIC >= VICReg at equal D (Table 8)", f"D={d}", "dim",
            {"method": "music_blocks", "d": d}, {"method": "vicreg", "d": d})
    return lines


def diagnostics_table(records: Sequence[dict[str, Any]]) -> list[str]:
    rows = select(records, "main")
    keys = ("usage_entropy", "min_usage_entropy", "confidence", "segment_mi", "agreement")
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for method in method_order(rows):
        group = [r for r in rows if r["method"] == method and f"heldout_{keys[0]}" in r]
        if group:
            cells = []
            for key in keys:
                mean, std = mean_std([r[f"heldout_{key}"] for r in group])
                cells.append(f"{mean:.3f} ± {std:.3f}")
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    meta, records = data["meta"], data["records"]
    train = meta.get("train_config", {})
    out = [
        "# Does MUSIC learn? Digits study",
        "",
        f"Generated by `python -m benchmarks.quality.digits` on {meta.get('date', '?')} "
        f"({meta.get('host', '?')}, torch {meta.get('torch', '?')}, "
        f"{meta.get('threads', '?')} threads); wall time "
        f"{meta.get('wall_seconds', 0) / 60:.1f} min. Seeds {meta.get('seeds')} (sweeps: "
        f"{meta.get('sweep_seeds')}); {train.get('epochs')} epochs of "
        f"{meta.get('steps_per_epoch')} steps, batch {train.get('batch_size')}, AdamW lr "
        f"{train.get('lr')}, identical augmentations and budget for every method; MUSIC "
        f"backend `{train.get('backend')}`, temperature {train.get('temperature')}.",
        "Data: scikit-learn digits (1797 8x8 images), stratified 70/30 train / held-out split "
        "drawn by the seed; probes read the frozen encoder's representation "
        f"({train.get('rep_dim')}-d) of un-augmented images. Accuracies on the held-out split, "
        "in %, mean ± std over seeds.",
        "",
        "## Methods",
        "",
        *main_table(records),
        "",
        "## The paper's orderings, here",
        "",
        f"Paired by seed (same split, same initialisation); |difference| <= {TIE_POINTS} "
        "points counts as a tie.",
        "",
        *ordering_lines(records),
        "",
    ]
    if select(records, "segment_dim"):
        out += ["## segment_dim at fixed D (analogue of Table 7)", "",
                *sweep_table(records, "segment_dim", "segment_dim", ["music_blocks"]), ""]
    if select(records, "dim"):
        out += ["## D at fixed segment_dim (analogue of Table 8)", "",
                *sweep_table(records, "dim", "d", ["music_blocks", "vicreg"]), ""]
    out += ["## MUSIC diagnostics of the trained code (two augmented views of held-out images)",
            "", *diagnostics_table(records), ""]
    if meta.get("notes"):
        out += ["## Notes", "", *[f"- {n}" for n in meta["notes"]], ""]
    return "\n".join(out)


def _errorbar_groups(ax: Any, records: Sequence[dict[str, Any]], methods: Sequence[str]) -> None:
    width = 0.8 / len(ACCURACIES)
    x = np.arange(len(methods))
    for i, (key, name) in enumerate(ACCURACIES):
        stats = [mean_std([r[key] for r in records if r["method"] == m]) for m in methods]
        ax.bar(x + (i - 1) * width, [100 * s[0] for s in stats], width,
               yerr=[100 * s[1] for s in stats], capsize=3, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([LABELS[m] for m in methods], rotation=25, ha="right", fontsize=8)


def plot_accuracy(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = select(data["records"], "main")
    methods = method_order(rows)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    _errorbar_groups(ax, rows, methods)
    low = min(100 * r[key] for r in rows for key, _ in ACCURACIES)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Digits: accuracy per method (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(data: dict[str, Any], study: str, field: str, methods: Sequence[str],
               xlabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = select(data["records"], study)
    fig, axes = plt.subplots(1, len(ACCURACIES), figsize=(12, 3.8))
    for ax, (key, name) in zip(axes, ACCURACIES):
        for m in methods:
            values = sorted({r[field] for r in rows if r["method"] == m})
            if not values:
                continue
            stats = [mean_std([r[key] for r in rows if r["method"] == m and r[field] == v])
                     for v in values]
            ax.errorbar(values, [100 * s[0] for s in stats], yerr=[100 * s[1] for s in stats],
                        marker="o", capsize=3, label=LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("usage_entropy", "usage entropy / log K"),
    ("confidence", "mean confidence"),
    ("segment_mi", "segment MI / log K"),
    ("agreement", "view agreement"),
    ("knn_acc", "held-out k-NN acc."),
)


def plot_curves(data: dict[str, Any], path: Path, methods: Sequence[str] = (
        "music_blocks", "music_entropy_only", "music_invariance_only")) -> None:
    """Training curves of seed-0 (or the first seed's) MUSIC runs in the main study."""
    import matplotlib.pyplot as plt

    curves = [c for c in data.get("curves", []) if "main" in c["studies"]
              and c["method"] in methods]
    if not curves:
        return
    first_seed = min(c["seed"] for c in curves)
    curves = [c for c in curves if c["seed"] == first_seed]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, name) in zip(axes.ravel(), CURVE_PANELS):
        for c in sorted(curves, key=lambda c: methods.index(c["method"])):
            points = [p for p in c["points"] if key in p]
            ax.plot([p["epoch"] for p in points], [p[key] for p in points],
                    marker="." if key == "knn_acc" else None, label=LABELS[c["method"]])
        if key == "confidence":
            k = curves[0]["segment_dim"]
            ax.axhline(1 / k, color="grey", ls=":", lw=1)
            ax.text(1, 1 / k, " 1/K", va="bottom", fontsize=8, color="grey")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"MUSIC training diagnostics (music_loss.metrics), digits, seed {first_seed}, "
                 f"D={curves[0]['d']}, K={curves[0]['segment_dim']}; "
                 "metrics averaged over each epoch's training batches", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(data: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write ``<name>.md`` and the PNGs next to the JSON; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [out_dir / f"{name}.md"]
    paths[0].write_text(render_markdown(data) + "\n")
    records = data["records"]
    if select(records, "main"):
        paths.append(out_dir / f"{name}-accuracy.png")
        plot_accuracy(data, paths[-1])
    if select(records, "segment_dim"):
        paths.append(out_dir / f"{name}-segment-dim.png")
        plot_sweep(data, "segment_dim", "segment_dim", ["music_blocks"],
                   "segment_dim K (D fixed)", paths[-1])
    if select(records, "dim"):
        paths.append(out_dir / f"{name}-dim.png")
        plot_sweep(data, "dim", "d", ["music_blocks", "vicreg"], "D (segment_dim fixed)",
                   paths[-1])
    if data.get("curves"):
        paths.append(out_dir / f"{name}-curves.png")
        plot_curves(data, paths[-1])
    return [p for p in paths if p.exists()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path, nargs="?",
                        default=Path("benchmarks/results/quality-digits.json"))
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    for path in write_report(data, args.json.parent, args.json.stem):
        print("wrote", path)
    print(render_markdown(data))


if __name__ == "__main__":
    main()
