"""Tables (Markdown) and plots (PNG) from the results JSON of a fair quality study.

Re-render without retraining: ``python -m benchmarks.quality.report
benchmarks/results/quality-digits.json``. Everything shown is in the JSON (the summary that
:func:`benchmarks.quality.fair.summarize` wrote beside the runs).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality.fair import METRICS
from benchmarks.quality.train import BASELINES, METHODS

LABELS: dict[str, str] = {**METHODS, **BASELINES}
ABLATION_TITLES: dict[str, str] = {
    "batch_size": "batch size (Table 4)",
    "projector_depth": "projector depth (Table 5)",
    "invariance": "entropy only vs entropy + invariance (Table 6)",
    "segment_dim": "segment dimension K at fixed D (Table 7)",
    "d": "feature dimension D (Table 8)",
}


def _cell(stat: dict[str, float] | None) -> str:
    return "-" if not stat else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def _compared(data: dict[str, Any]) -> list[str]:
    return list(data.get("methods", {}))


def _setting(params: dict[str, Any] | None) -> str:
    if not params:
        return "-"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def headline_table(data: dict[str, Any]) -> list[str]:
    lines = ["| method | selected on validation | val. score | seeds | "
             + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for m in _compared(data):
        entry = data["methods"].get(m, {})
        test = entry.get("test")
        score = entry.get("selected_validation_score")
        lines.append(f"| {LABELS[m]} | {_setting(entry.get('selected'))} | "
                     f"{'-' if score is None else f'{100 * score:.1f}'} | "
                     f"{len(test['seeds']) if test else 0} | "
                     + " | ".join(_cell(test.get(k) if test else None) for k, _ in METRICS)
                     + " |")
    for b, stats in data.get("baselines", {}).items():
        lines.append(f"| {LABELS[b]} | - | - | {stats[METRICS[0][0]]['n']} | "
                     + " | ".join(_cell(stats.get(k)) for k, _ in METRICS) + " |")
    return lines


def comparison_table(data: dict[str, Any]) -> list[str]:
    lines = ["| A vs B | metric | A | B | A - B (pts, mean ± std over seeds) | per-seed A - B | "
             "A ahead on | verdict on A >= B |", "|---|---|---|---|---|---|---|---|"]
    labels = dict(METRICS)
    for c in data.get("comparisons", []):
        lines.append(f"| {LABELS[c['a']]} vs {LABELS[c['b']]} | {labels[c['metric']]} | "
                     f"{c['mean_a']:.1f} | {c['mean_b']:.1f} | {c['mean_diff']:+.1f} ± "
                     f"{c['std_diff']:.1f} | " + " ".join(f"{d:+.1f}" for d in c["diffs"])
                     + f" | {c['wins']}/{c['n']} | {c['verdict']} |")
    return lines


def claims_table(data: dict[str, Any]) -> list[str]:
    lines = ["| table | paper's claim | setting here | metric | measured | verdict |",
             "|---|---|---|---|---|---|"]
    for c in data.get("paper_claims", []):
        lines.append(f"| {c['table']} | {c['claim']} | {c['setting']} | {c['metric']} | "
                     f"{c['measured']} | {c['verdict']} |")
    return lines


def verdict_counts(data: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for c in data.get("paper_claims", []):
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    return ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())) or "none measured"


def ablation_tables(data: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, rows in data.get("ablations", {}).items():
        if not rows:
            continue
        out += [f"### {ABLATION_TITLES.get(name, name)}", "",
                "| method | value | seeds | " + " | ".join(label for _, label in METRICS) + " |",
                "|---|---|---|" + "---|" * len(METRICS)]
        for row in rows:
            out.append(f"| {LABELS[row['method']]} | {row['value']} | "
                       f"{row[METRICS[0][0]]['n']} | "
                       + " | ".join(_cell(row[k]) for k, _ in METRICS) + " |")
        out.append("")
    return out


def search_table(data: dict[str, Any]) -> list[str]:
    """Per method and axis: the values tried, the selected one, inside or at an edge."""
    lines = ["| method | points (runs) | axis | values tried | selected | inside? |",
             "|---|---|---|---|---|---|"]
    for m in _compared(data):
        found = data["methods"][m].get("search")
        if not found:
            continue
        for name, axis in found["axes"].items():
            tried = ", ".join(f"{v:.4g}" for v in axis["values_tried"])
            sel = "-" if axis["selected"] is None else f"{axis['selected']:.4g}"
            lines.append(f"| {LABELS[m]} | {found['points']} ({found['runs']}) | {name} | "
                         f"{tried} | **{sel}** | {'yes' if axis['interior'] else '**no**'} |")
        if found.get("walls"):
            lines.append(f"| {LABELS[m]} | | walls (loss not finite) | "
                         + "; ".join(_setting(w) for w in found["walls"]) + " | | |")
    return lines


def tuning_tables(data: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for m in _compared(data):
        entry = data["methods"].get(m)
        if not entry:
            continue
        out += [f"### {LABELS[m]}: {len(entry['tuning'])} settings tried", "",
                "| setting | validation score (per seed) | "
                + " | ".join(lab for _, lab in METRICS)
                + " | selected |", "|---|---|" + "---|" * len(METRICS) + "---|"]
        for t in sorted(entry["tuning"], key=lambda t: -(t["validation_score"] or -1.0)):
            chosen = "**yes**" if t["params"] == entry.get("selected") else ""
            if t["validation_score"] is None:
                out.append(f"| {_setting(t['params'])} | diverged | "
                           + " | ".join("-" for _ in METRICS) + f" | {chosen} |")
                continue
            per_seed = ", ".join(f"{100 * v:.1f}" for v in t.get("validation_scores", [])
                                 if v is not None)
            out.append(f"| {_setting(t['params'])} | {100 * t['validation_score']:.1f} "
                       f"({per_seed}) | "
                       + " | ".join(f"{100 * t['validation'][k]:.1f}" for k, _ in METRICS)
                       + f" | {chosen} |")
        out.append("")
    return out


def render_markdown(data: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    meta = data["meta"]
    grid = meta.get("grid", {})
    stage_lines = []
    for s in meta.get("stages", {}).values():
        stage_lines.append(
            f"- `{s.get('command')}`: {s.get('runs_done', 0)} runs, "
            f"{s.get('wall_seconds', 0) / 60:.1f} min wall, {s.get('workers')} worker(s) x "
            f"{s.get('threads_per_run')} thread(s), {s.get('epochs')} epochs, started "
            f"{s.get('started')}, 1-min load average mean "
            f"{s.get('load_average_1min_mean', float('nan')):.1f} (max "
            f"{s.get('load_average_1min_max', float('nan')):.1f})"
            + ("" if s.get("complete") else " - **interrupted, incomplete**"))
    out = [
        f"# Does MUSIC learn, fairly? {meta.get('dataset', 'digits')} study",
        "",
        f"Data: {meta.get('split')}. Host {meta.get('host')}, torch {meta.get('torch')}; "
        f"{meta.get('epochs')} epochs per run.",
        f"Selection: on validation only, the mean over seeds {grid.get('tune_seeds')}; "
        f"validation score = {meta.get('validation_score')}. Budget per method: "
        f"{grid.get('budget_per_method')}; points per method in this study: "
        f"{data.get('budget_points_per_method')}. "
        "The test split is read once per selected setting (the headline).",
        "Scoring: \"A >= B\" is *reproduced* only if A's mean is higher and A is ahead on most "
        "seeds (paired by seed: same initialisation, augmentation draws and label draws); "
        "*not reproduced* when B is ahead on both counts; *inconclusive* otherwise.",
        "",
        "Stages run:",
        "",
        *stage_lines,
        "",
        "## Headline: tuned methods on the test split (accuracy %, mean ± std over seeds)",
        "",
        *headline_table(data),
        "",
        "## Paired differences (test split)",
        "",
        *comparison_table(data),
        "",
        f"## The paper's claims here ({verdict_counts(data)})",
        "",
        "Headline rows: test split, 5 seeds. Ablation rows (Tables 4-8): validation split, "
        "from the selected MUSIC (blocks) and VICReg settings, changing one thing.",
        "",
        *claims_table(data),
        "",
        "## Ablations in miniature (validation split, accuracy %)",
        "",
        *ablation_tables(data),
        "## The search: values tried per axis, the selected value inside them",
        "",
        *search_table(data),
        "",
        "## Every setting tried (validation, mean over the tuning seeds)",
        "",
        *tuning_tables(data),
    ]
    if meta.get("notes"):
        out += ["## Notes", "", *[f"- {n}" for n in meta["notes"]], ""]
    return "\n".join(out)


def plot_headline(data: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = [(LABELS[m], data["methods"][m]["test"]) for m in _compared(data)
            if data["methods"].get(m, {}).get("test")]
    rows += [(LABELS[b], s) for b, s in data.get("baselines", {}).items()]
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(METRICS), figsize=(15, 4))
    for ax, (key, label) in zip(axes, METRICS):
        means = [r[1][key]["mean"] for r in rows]
        stds = [r[1][key]["std"] for r in rows]
        colors = ["C0" if i < len(rows) - len(data.get("baselines", {})) else "grey"
                  for i in range(len(rows))]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r[0] for r in rows], rotation=35, ha="right", fontsize=7)
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, low - 3), min(100.0, max(means) + 3))
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    fig.suptitle("Digits, tuned on validation: test accuracy (baselines in grey)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_tuning(data: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    entries = [(m, data["methods"][m]) for m in _compared(data)
               if data["methods"].get(m, {}).get("tuning")]
    if not entries:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (_, entry) in enumerate(entries):
        scored = [t for t in entry["tuning"] if t["validation_score"] is not None]
        scores = [100 * t["validation_score"] for t in scored]
        jitter = np.linspace(-0.15, 0.15, len(scores))
        ax.scatter(i + jitter, scores, s=18, color="C0", alpha=0.7,
                   label="setting tried" if i == 0 else None)
        chosen = [j for j, t in enumerate(scored) if t["params"] == entry["selected"]]
        if chosen:
            ax.scatter(i + jitter[chosen], [scores[j] for j in chosen], s=110, marker="*",
                       color="C3", zorder=3, label="selected" if i == 0 else None)
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([LABELS[m] for m, _ in entries], fontsize=8)
    ax.set_ylabel("validation score (%)")
    ax.set_title("Every setting tried (validation split, mean over the tuning seeds)",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ablations(data: dict[str, Any], path: Path,
                   keys: Sequence[str] = ("linear_probe_5_acc", "knn_1_acc")) -> bool:
    import matplotlib.pyplot as plt

    tables = {k: v for k, v in data.get("ablations", {}).items() if v}
    if not tables:
        return False
    labels = dict(METRICS)
    fig, axes = plt.subplots(len(keys), len(tables), figsize=(3.4 * len(tables), 6),
                             squeeze=False)
    colors: dict[str, str] = {}  # one colour per method across the panels
    for col, (name, rows) in enumerate(tables.items()):
        for row_i, key in enumerate(keys):
            ax = axes[row_i, col]
            methods = list(dict.fromkeys(r["method"] for r in rows))
            values = list(dict.fromkeys(str(r["value"]) for r in rows))
            for j, m in enumerate(methods):
                pts = [r for r in rows if r["method"] == m]
                ax.errorbar([values.index(str(r["value"])) + 0.06 * j for r in pts],
                            [r[key]["mean"] for r in pts], yerr=[r[key]["std"] for r in pts],
                            marker="o", capsize=3, label=LABELS[m],
                            color=colors.setdefault(m, f"C{len(colors)}"))
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels(values, fontsize=7)
            ax.grid(alpha=0.3)
            if row_i == 0:
                ax.set_title(ABLATION_TITLES.get(name, name), fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{labels[key]} (%)", fontsize=8)
    handles = {h.get_label(): h for ax in axes.ravel()
               for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=len(handles), fontsize=8)
    fig.suptitle("Ablations in miniature (validation split, mean ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("usage_entropy", "usage entropy / log K"),
    ("confidence", "mean confidence"),
    ("segment_redundancy", "segment redundancy (NMI of hard assignments)"),
    ("agreement", "view agreement"),
)


def plot_curves(data: dict[str, Any], path: Path) -> bool:
    """MUSIC's training diagnostics in the headline's first seed."""
    import matplotlib.pyplot as plt

    runs = [r for r in data["runs"] if r.get("curve") and r["spec"]["method"].startswith("music")]
    if not runs:
        return False
    first = min(r["spec"]["seed"] for r in runs)
    runs = [r for r in runs if r["spec"]["seed"] == first]
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(16, 3.4))
    for ax, (key, name) in zip(axes, CURVE_PANELS):
        for r in runs:
            points = [p for p in r["curve"] if key in p]
            ax.plot([p["epoch"] for p in points], [p[key] for p in points],
                    label=LABELS[r["spec"]["method"]])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MUSIC training diagnostics (music_loss.metrics), headline runs, seed {first}; "
                 "averaged over each epoch's training batches", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(data: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write ``<name>.md`` and the PNGs next to the JSON; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [out_dir / f"{name}.md"]
    paths[0].write_text(render_markdown(data) + "\n")
    for suffix, plot in (("accuracy", plot_headline), ("tuning", plot_tuning),
                         ("ablations", plot_ablations), ("curves", plot_curves)):
        path = out_dir / f"{name}-{suffix}.png"
        if plot(data, path):
            paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path, nargs="?",
                        default=Path("benchmarks/results/quality-digits.json"))
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    for path in write_report(data, args.json.parent, args.json.stem):
        print("wrote", path)


if __name__ == "__main__":
    main()
