"""The fair study: what each stage runs, how settings are selected, how claims are scored.

A run is a *spec* (a JSON-ready dict: dataset, method, seed, epochs, batch size, lr,
augmentation, projector depth, D, segment_dim, the loss hyperparameters, and which split it
is scored on); :func:`execute` turns a spec into a record. :func:`plan` lists a stage's specs
from the runs done so far, and :func:`summarize` derives everything else (tuning tables,
searches, selections, paired comparisons, ablations, the paper's claims) from the runs alone,
so the report re-renders from the JSON.

Tuning (:func:`search`) is a pattern search on a log lattice, the same for every method: each
numeric axis (the learning rate and the method's own hyperparameters) has a start and a
step factor; a *point* is scored by its validation score averaged over the tuning seeds.
From the start, the search scores the point and its two neighbours on every axis, moves to
the best point scored so far, and repeats until the best point's neighbours on every axis
have all been scored: the selected value of every axis then lies strictly inside the values
tried. Every method then gets the same number of points (the study's budget, or the most
any method needed, if more): the rest go to the same search at half steps around the best
point. A run whose loss stops being finite records a *wall* (it scores below every finite
run, so the search turns back from it).

Scoring rule: "A >= B" is reproduced only if A's mean is higher AND A is higher on most
seeds (paired by seed); "not reproduced" when B is ahead on both counts; otherwise
"inconclusive". Nothing is called a tie that holds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import numpy as np

from benchmarks.quality.data import DATASETS, ImageSplit, augments_for, load_fit_val_test
from benchmarks.quality.train import BASELINES, METHODS, TrainConfig, evaluate_baseline, train_run

STAGES = ("headline", "tune", "ablations")
#: The metrics the validation score averages (the few-label end, where methods separate).
SCORE_METRICS = ("linear_probe_1_acc", "linear_probe_5_acc", "knn_1_acc")
VALIDATION_SCORE_DESCRIPTION = ("mean of " + ", ".join(SCORE_METRICS) + " on the validation "
                                "split (1- and 5-label probes averaged over 10 label draws)")
#: Metrics reported per comparison (key, label), the few-label ones first.
METRICS: tuple[tuple[str, str], ...] = (
    ("linear_probe_1_acc", "linear probe, 1 label/class"),
    ("linear_probe_5_acc", "linear probe, 5 labels/class"),
    ("knn_1_acc", "k-NN, k=1"),
    ("knn_5_acc", "k-NN, k=5"),
    ("linear_probe_acc", "linear probe, all labels"),
)
CLAIM_METRICS = ("linear_probe_1_acc", "linear_probe_5_acc", "knn_1_acc", "linear_probe_acc")


@dataclass(frozen=True)
class Axis:
    """One tuned hyperparameter: lattice values ``start * factor**k``."""

    name: str
    start: float
    factor: float

    def value(self, exponent: float) -> float:
        """The value at ``exponent`` steps from the start, to 4 significant digits.

        Example:
            >>> Axis("lr", 2e-3, 2.0).value(-1), Axis("lr", 2e-3, 2.0).value(0.5)
            (0.001, 0.002828)
        """
        return float(f"{self.start * self.factor ** exponent:.4g}")


#: Each method's tuned axes: the learning rate, then its own main hyperparameters (MUSIC:
#: the softmax temperature; Barlow Twins: lambda; VICReg: the variance and covariance weights,
#: the invariance weight fixed at 25, as its authors tune it).
LR_AXIS = Axis("lr", 2e-3, 2.0)
METHOD_AXES: dict[str, tuple[Axis, ...]] = {
    "music_blocks": (LR_AXIS, Axis("temperature", 0.5, 2.0)),
    "music_joint": (LR_AXIS, Axis("temperature", 0.5, 2.0)),
    "barlow_twins": (LR_AXIS, Axis("lambd", 0.0051, 4.0)),
    "vicreg": (LR_AXIS, Axis("std_coeff", 25.0, 2.0), Axis("cov_coeff", 1.0, 4.0)),
}
#: Fixed loss hyperparameters that are not tuned.
FIXED_HP: dict[str, dict[str, float]] = {"vicreg": {"sim_coeff": 25.0}}


@dataclass(frozen=True)
class Grid:
    """Every setting a study may try; the same budget for every method."""

    d: int = 512
    segment_dim: int = 16
    batch_size: int = 256
    augment: str = "medium"
    depth: int = 2
    tune_seeds: tuple[int, ...] = (0, 1)
    budget_points: int = 12  # points per method (each scored on every tuning seed)
    max_points: int = 40  # a search that has not converged by then stops (reported)
    headline_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    ablation_batch_sizes: tuple[int, ...] = (64, 256)
    ablation_depths: tuple[int, ...] = (2, 3, 4)
    ablation_segment_dims: tuple[int, ...] = (8, 16, 32)
    ablation_dims: tuple[int, ...] = (128, 512, 1024)

    @classmethod
    def quick(cls) -> Grid:
        """A tiny grid for smoke tests (every stage, a few runs each)."""
        return cls(d=32, segment_dim=8, tune_seeds=(0, 1), budget_points=3, max_points=3,
                   headline_seeds=(0, 1), ablation_seeds=(0, 1),
                   ablation_batch_sizes=(128, 256), ablation_depths=(2, 3),
                   ablation_segment_dims=(4, 8), ablation_dims=(16, 32))

    def describe(self, compared: tuple[str, ...]) -> dict[str, Any]:
        """The grid as JSON-ready data (for the results' meta)."""
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items()}
        out["axes"] = {m: [a.__dict__ for a in METHOD_AXES[m]] for m in compared}
        out["fixed_hyperparameters"] = {m: FIXED_HP.get(m, {}) for m in compared}
        out["budget_per_method"] = (
            f"the same number of points for every method: {self.budget_points}, or the most "
            f"any method's search needed to converge, if more; each point trained and scored "
            f"on {len(self.tune_seeds)} seeds ({list(self.tune_seeds)}), validation split, "
            f"same epochs; augmentation '{self.augment}' and projector depth {self.depth} for "
            "all")
        return out


@dataclass(frozen=True)
class Study:
    """One dataset's study: its split, budget and which methods it compares."""

    dataset: str
    epochs: int
    test_fraction: float
    compared: tuple[str, ...]
    grid: Grid = field(default_factory=Grid)
    ablations: bool = False  # the paper's ablations in miniature (the ablations stage)

    def describe_split(self) -> str:
        to_val, to_test = _splits(self.dataset, self.test_fraction)
        return (f"{DATASETS[self.dataset]}: fixed stratified test split "
                f"({self.test_fraction:.0%}, {len(to_test.test_labels)} images, split seed 0); "
                f"validation = 20% of the rest ({len(to_val.test_labels)}), carved stratified; "
                f"every run trains on the remaining {len(to_val.train_labels)} 'fit' images, "
                "and the probes learn from the fit images' labels")

    def quick(self) -> Study:
        """The smoke-test version: 1 epoch, the tiny grid."""
        return replace(self, epochs=1, grid=Grid.quick())


STUDIES: dict[str, Study] = {
    "digits": Study("digits", epochs=30, test_fraction=0.3,
                    compared=("music_blocks", "music_joint", "barlow_twins", "vicreg"),
                    ablations=True),
    # A 28x28 run costs about 5x a digits run on 2 cores: 8 points per method at least.
    "mnist5k": Study("mnist5k", epochs=15, test_fraction=0.2,
                     compared=("music_blocks", "barlow_twins", "vicreg"),
                     grid=Grid(budget_points=8)),
}


def spec_key(spec: dict[str, Any]) -> str:
    """A canonical string for a spec (runs are deduplicated on it)."""
    return json.dumps(spec, sort_keys=True)


def make_spec(method: str, seed: int, epochs: int, *, evaluate_on: str, dataset: str = "digits",
              lr: float = 0.0, augment: str = "medium", depth: int = 2, d: int = 0,
              segment_dim: int = 0, batch_size: int = 256,
              hp: dict[str, float] | None = None) -> dict[str, Any]:
    """One run's settings as a JSON-ready dict (baselines keep only method, seed, split)."""
    if method in BASELINES:
        return {"dataset": dataset, "method": method, "seed": seed, "evaluate_on": evaluate_on}
    return {"dataset": dataset, "method": method, "seed": seed, "epochs": epochs,
            "evaluate_on": evaluate_on, "lr": lr, "augment": augment, "projector_depth": depth,
            "d": d, "segment_dim": segment_dim, "batch_size": batch_size, "hp": dict(hp or {})}


def params_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The tunable part of a spec, flat (for the ``tuning``/``selected`` tables)."""
    keys = ("lr", "augment", "projector_depth", "batch_size", "d", "segment_dim")
    return {**{k: spec[k] for k in keys}, **spec["hp"]}


@cache
def _splits(dataset: str, test_fraction: float) -> tuple[ImageSplit, ImageSplit]:
    return load_fit_val_test(0, test_fraction=test_fraction, dataset=dataset)


def execute(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and probe one spec; the record holds the spec, metrics and (headline) curve.

    A run whose loss stops being finite is recorded with ``"diverged": True`` and no
    metrics (a wall for the tuning search), instead of stopping the study.
    """
    study = STUDIES[spec["dataset"]]
    to_val, to_test = _splits(study.dataset, study.test_fraction)
    split = to_val if spec["evaluate_on"] == "validation" else to_test
    start = time.perf_counter()
    record: dict[str, Any] = {"spec": spec}
    if spec["method"] in BASELINES:
        record["metrics"] = evaluate_baseline(spec["method"], split, TrainConfig(), spec["seed"])
    else:
        hp = dict(spec["hp"])
        temperature = hp.pop("temperature", 1.0)
        headline = spec["evaluate_on"] == "test"
        cfg = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"], lr=spec["lr"],
                          temperature=temperature,
                          augment=augments_for(study.dataset)[spec["augment"]],
                          projector_depth=spec["projector_depth"], loss_params=hp,
                          log_every=0, diagnostics=headline)
        try:
            result = train_run(spec["method"], split, cfg, seed=spec["seed"],
                               segment_dim=spec["segment_dim"], dim=spec["d"])
        except FloatingPointError as err:
            record.update(metrics=None, diverged=True, error=str(err))
        else:
            record["metrics"] = result.metrics
            if headline:
                record["curve"] = result.curve
    record["seconds"] = time.perf_counter() - start
    if spec["evaluate_on"] == "validation":
        record["validation_score"] = (None if record.get("diverged")
                                      else validation_score(record["metrics"]))
    return record


def validation_score(metrics: dict[str, Any]) -> float:
    """The one number selection maximises (see :data:`VALIDATION_SCORE_DESCRIPTION`)."""
    return float(np.mean([metrics[k] for k in SCORE_METRICS]))


def describe_run(record: dict[str, Any]) -> str:
    """One log line per finished run."""
    s, m = record["spec"], record["metrics"]
    setting = "" if s["method"] in BASELINES else (
        f" lr={s['lr']:g} aug={s['augment']} depth={s['projector_depth']} D={s['d']} "
        f"K={s['segment_dim']} bs={s['batch_size']} " + " ".join(f"{k}={v:g}"
                                                               for k, v in s["hp"].items()))
    if m is None:
        return (f"{s['method']:>18} seed={s['seed']} on {s['evaluate_on']}:{setting} | "
                f"DIVERGED: {record.get('error')} ({record['seconds']:.0f} s)")
    score = (f" score {100 * record['validation_score']:.1f}"
             if record.get("validation_score") is not None else "")
    return (f"{s['method']:>18} seed={s['seed']} on {s['evaluate_on']}:{setting} | "
            + "  ".join(f"{label.split(',')[-1].strip()} {100 * m[k]:.1f}"
                        for k, label in METRICS) + f"{score} ({record['seconds']:.0f} s)")


# ---------------------------------------------------------------------------------------------
# The tuning search

Point = tuple[float, ...]  # exponents, one per axis of the method


def _point_spec(study: Study, method: str, point: Point, seed: int) -> dict[str, Any]:
    g = study.grid
    hp = dict(FIXED_HP.get(method, {}))
    values = {a.name: a.value(e) for a, e in zip(METHOD_AXES[method], point)}
    lr = values.pop("lr")
    hp.update(values)
    return make_spec(method, seed, study.epochs, evaluate_on="validation",
                     dataset=study.dataset, lr=lr, augment=g.augment, depth=g.depth, d=g.d,
                     segment_dim=g.segment_dim, batch_size=g.batch_size, hp=hp)


def _star(center: Point, step: float) -> list[Point]:
    """``center``, then its two neighbours at ``step`` on each axis (minus first)."""
    out = [center]
    for i in range(len(center)):
        for sign in (-1, 1):
            out.append(center[:i] + (center[i] + sign * step,) + center[i + 1:])
    return out


@dataclass
class Search:
    """One method's search, derived from the runs: what is scored, what to run next."""

    method: str
    scores: dict[Point, float | None] = field(default_factory=dict)  # None: a wall
    order: list[Point] = field(default_factory=list)  # points in the order they were planned
    todo: list[Point] = field(default_factory=list)
    coarse_points: int = 0
    converged: bool = False
    capped: bool = False

    @property
    def best(self) -> Point | None:
        finite = [p for p in self.order if self.scores.get(p) is not None]
        return max(finite, key=lambda p: self.scores[p]) if finite else None  # type: ignore


def _point_scores(study: Study, method: str, runs: list[dict[str, Any]]
                  ) -> dict[str, dict[str, Any]]:
    return {spec_key(r["spec"]): r for r in runs if r["spec"].get("method") == method
            and r["spec"].get("evaluate_on") == "validation"
            and r["spec"].get("dataset", "digits") == study.dataset}


def search(study: Study, method: str, runs: list[dict[str, Any]], budget: int | None = None
           ) -> Search:
    """Replay ``method``'s search on the runs done so far (see the module docstring).

    ``budget``: the points every method ends with (``None``: only the coarse search).
    """
    g = study.grid
    done = _point_scores(study, method, runs)
    state = Search(method)

    def score(point: Point) -> bool:
        """Score ``point`` if all its seeds ran; else queue it. True if scored."""
        if point in state.scores:
            return True
        if point not in state.order:
            state.order.append(point)
        recs = [done.get(spec_key(_point_spec(study, method, point, s))) for s in g.tune_seeds]
        if any(r is None for r in recs):
            if point not in state.todo:
                state.todo.append(point)
            return False
        vals = [r["validation_score"] for r in recs]  # type: ignore[index]
        state.scores[point] = None if any(v is None for v in vals) else float(np.mean(vals))
        return True

    center: Point = tuple(0.0 for _ in METHOD_AXES[method])
    step = 1.0
    while True:
        star = _star(center, step)
        new = [p for p in star if p not in state.order]
        # The coarse search stops at max_points (reported); refining stops at the budget.
        room = max(0, (g.max_points if step == 1.0 else (budget or 0)) - len(state.order))
        capped = step == 1.0 and len(new) > room
        ready = [score(p) for p in [p for p in star if p in state.order] + new[:room]]
        if not all(ready):  # score() queued the missing points
            return state
        best = state.best
        if capped or best is None:  # out of points, or every point a wall
            state.capped = True
            return state
        if best != center:
            center = best
            continue
        if step == 1.0:
            state.converged, state.coarse_points = True, len(state.order)
        if budget is None or len(state.order) >= budget:
            return state
        step /= 2  # refine around the best point at half the step


def budget_of(study: Study, runs: list[dict[str, Any]]) -> int | None:
    """The points every method gets: the study's budget, or the most any method's coarse
    search used if more; ``None`` until every method's coarse search has converged."""
    states = [search(study, m, runs) for m in study.compared]
    if not all(s.converged or s.capped for s in states):
        return None
    return max([study.grid.budget_points] + [len(s.order) for s in states])


def _tune_specs(study: Study, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every tuning spec planned so far (done or not), for every method."""
    budget = budget_of(study, runs)  # refining waits for it: every method the same points
    specs = []
    for m in study.compared:
        state = search(study, m, runs, budget)
        specs += [_point_spec(study, m, p, seed) for p in state.order
                  for seed in study.grid.tune_seeds]
    return specs


def selections(study: Study, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: the selected spec (seed of the first tuning seed), once tuning is done."""
    budget = budget_of(study, runs)
    chosen: dict[str, Any] = {"selected": {}, "budget_points": budget}
    if budget is None:
        return chosen
    states = {m: search(study, m, runs, budget) for m in study.compared}
    if any(s.todo for s in states.values()):
        return chosen
    for m, state in states.items():
        if state.best is not None:
            chosen["selected"][m] = _point_spec(study, m, state.best, study.grid.tune_seeds[0])
    return chosen


def _ablation_specs(selected: dict[str, dict[str, Any]], grid: Grid
                    ) -> dict[str, list[tuple[str, Any, dict[str, Any]]]]:
    """Per ablation: (method, varied value, spec template with seed to fill)."""
    music, vicreg = selected["music_blocks"], selected["vicreg"]
    out: dict[str, list[tuple[str, Any, dict[str, Any]]]] = {
        "batch_size": [(s["method"], b, dict(s, batch_size=b))
                       for s in (music, vicreg) for b in grid.ablation_batch_sizes],
        "projector_depth": [(s["method"], p, dict(s, projector_depth=p))
                            for s in (music, vicreg) for p in grid.ablation_depths],
        "invariance": [("music_blocks", "entropy + invariance", music),
                       ("music_entropy_only", "entropy only",
                        dict(music, method="music_entropy_only"))],
        "segment_dim": [("music_blocks", k, dict(music, segment_dim=k))
                        for k in grid.ablation_segment_dims if music["d"] % k == 0],
        "d": [(s["method"], d, dict(s, d=d)) for s in (music, vicreg)
              for d in grid.ablation_dims if d % music["segment_dim"] == 0],
    }
    return out


def plan(stage: str, runs: list[dict[str, Any]], study: Study) -> list[dict[str, Any]]:
    """The specs of ``stage`` that can be planned from ``runs`` (call again after running)."""
    if stage == "tune":
        return _tune_specs(study, runs)
    selected = selections(study, runs)["selected"]
    if len(selected) < len(study.compared):
        raise ValueError(f"stage {stage!r} needs the tuning runs: run `python -m "
                         f"benchmarks.quality.study --dataset {study.dataset} --stage tune "
                         "--resume` first (or pass the same --quick as the tuning run)")
    grid = study.grid
    if stage == "headline":
        specs = [dict(selected[m], seed=seed, evaluate_on="test")
                 for seed in grid.headline_seeds for m in study.compared]
        specs += [make_spec(b, seed, 0, evaluate_on="test", dataset=study.dataset)
                  for seed in grid.headline_seeds for b in BASELINES]
        return specs
    if stage == "ablations":
        if not study.ablations:
            raise ValueError(f"the {study.dataset} study has no ablations stage (the digits "
                             "study has)")
        return [dict(template, seed=seed) for seed in grid.ablation_seeds
                for variants in _ablation_specs(selected, grid).values()
                for _, _, template in variants]
    raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")


# ---------------------------------------------------------------------------------------------
# Scoring


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Paired (by seed) comparison of A and B in accuracy points, with the verdict on A >= B.

    Example:
        >>> paired({0: 0.90, 1: 0.91, 2: 0.89}, {0: 0.88, 1: 0.92, 2: 0.87})["verdict"]
        'reproduced'
        >>> paired({0: 0.90, 1: 0.90}, {0: 0.89, 1: 0.91})["verdict"]
        'inconclusive'
    """
    seeds = sorted(set(a) & set(b))
    diffs = np.array([100 * (a[s] - b[s]) for s in seeds])
    n = len(seeds)
    if n == 0:
        return {"n": 0, "verdict": "not measured"}
    mean = float(diffs.mean())
    std = float(diffs.std(ddof=1)) if n > 1 else 0.0
    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    if mean > 0 and wins > n / 2:
        verdict = "reproduced"
    elif mean < 0 and losses > n / 2:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return {"n": n, "seeds": seeds, "diffs": [float(x) for x in diffs], "mean_diff": mean,
            "std_diff": std, "wins": wins, "losses": losses,
            "mean_a": float(100 * np.mean([a[s] for s in seeds])),
            "mean_b": float(100 * np.mean([b[s] for s in seeds])), "verdict": verdict}


def measured_text(p: dict[str, Any]) -> str:
    """A paired comparison in one line of text."""
    if p["n"] == 0:
        return "not measured"
    return (f"{p['mean_a']:.1f} vs {p['mean_b']:.1f}: {p['mean_diff']:+.1f} ± "
            f"{p['std_diff']:.1f} pts, ahead on {p['wins']}/{p['n']} seeds")


def _by_seed(runs: list[dict[str, Any]], template: dict[str, Any], metric: str
             ) -> dict[int, float]:
    ignore = {"seed"}
    key = {k: v for k, v in template.items() if k not in ignore}
    return {r["spec"]["seed"]: r["metrics"][metric] for r in runs
            if {k: v for k, v in r["spec"].items() if k not in ignore} == key}


def _stats(values: list[float]) -> dict[str, float]:
    arr = 100 * np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "n": len(arr)}


def _search_summary(study: Study, state: Search) -> dict[str, Any]:
    """Per axis: the values tried, the selected one and whether it is strictly inside."""
    axes = METHOD_AXES[state.method]
    best = state.best
    out: dict[str, Any] = {"points": len(state.order),
                           "runs": len(state.order) * len(study.grid.tune_seeds),
                           "coarse_points": state.coarse_points, "converged": state.converged,
                           "stopped_at_max_points": state.capped, "axes": {}}
    for i, axis in enumerate(axes):
        tried = sorted({axis.value(p[i]) for p in state.order})
        chosen = None if best is None else axis.value(best[i])
        out["axes"][axis.name] = {
            "values_tried": tried, "selected": chosen,
            "interior": chosen is not None and tried[0] < chosen < tried[-1]}
    out["walls"] = [{a.name: a.value(e) for a, e in zip(axes, p)} for p in state.order
                    if p in state.scores and state.scores[p] is None]
    return out


def summarize(runs: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    """Everything the report shows, derived from the runs of ``study``."""
    grid = study.grid
    chosen = selections(study, runs)
    budget = chosen["budget_points"]
    methods: dict[str, Any] = {}
    for m in study.compared:
        state = search(study, m, runs, budget)
        done = _point_scores(study, m, runs)
        tuning = []
        for point in state.order:
            recs = [done.get(spec_key(_point_spec(study, m, point, s))) for s in grid.tune_seeds]
            recs = [r for r in recs if r is not None]
            if len(recs) < len(grid.tune_seeds):
                continue
            spec = _point_spec(study, m, point, grid.tune_seeds[0])
            walled = any(r.get("diverged") for r in recs)
            tuning.append({
                "params": params_of(spec),
                "validation_score": state.scores.get(point),
                "validation_scores": [r["validation_score"] for r in recs],
                "seeds": list(grid.tune_seeds), "diverged": walled,
                "validation": None if walled else {
                    k: float(np.mean([r["metrics"][k] for r in recs])) for k, _ in METRICS}})
        entry: dict[str, Any] = {"label": METHODS[m], "tuning": tuning,
                                 "search": _search_summary(study, state),
                                 "selected": None, "selected_on": "validation",
                                 "selected_on_seeds": list(grid.tune_seeds)}
        if m in chosen["selected"]:
            sel = chosen["selected"][m]
            entry["selected"] = params_of(sel)
            entry["selected_validation_score"] = next(
                t["validation_score"] for t in tuning if t["params"] == params_of(sel))
            test = [r for r in runs if r["spec"] == dict(sel, seed=r["spec"]["seed"],
                                                         evaluate_on="test")]
            if test:
                entry["test"] = {k: _stats([r["metrics"][k] for r in test]) for k, _ in METRICS}
                entry["test"]["seeds"] = sorted(r["spec"]["seed"] for r in test)
        methods[m] = entry
    baselines = {}
    for b in BASELINES:
        rows = [r for r in runs if r["spec"]["method"] == b
                and r["spec"].get("dataset", "digits") == study.dataset]
        if rows:
            baselines[b] = {k: _stats([r["metrics"][k] for r in rows]) for k, _ in METRICS}
    out: dict[str, Any] = {"methods": methods, "baselines": baselines,
                           "budget_points_per_method": budget,
                           "comparisons": [], "ablations": {}, "paper_claims": []}
    if len(chosen["selected"]) < len(study.compared):
        return out
    sel = chosen["selected"]
    test_template = {m: dict(sel[m], evaluate_on="test") for m in study.compared}
    musics = [m for m in ("music_blocks", "music_joint") if m in study.compared]
    peers = [m for m in ("vicreg", "barlow_twins") if m in study.compared]
    for a in musics:
        for b in peers:
            for key, label in METRICS:
                p = paired(_by_seed(runs, test_template[a], key),
                           _by_seed(runs, test_template[b], key))
                if p["n"]:
                    out["comparisons"].append({"a": a, "b": b, "metric": key, **p})
                    if key in CLAIM_METRICS and a == "music_blocks":
                        out["paper_claims"].append({
                            "table": "Table 1", "claim": f"{METHODS[a]} >= {METHODS[b]}",
                            "setting": f"tuned on validation, test split, {p['n']} seeds",
                            "metric": label, "measured": measured_text(p),
                            "verdict": p["verdict"]})
    if study.ablations:
        out["ablations"], claims = _ablations(runs, sel, grid)
        out["paper_claims"] += claims
    return out


def _ablations(runs: list[dict[str, Any]], selected: dict[str, dict[str, Any]], grid: Grid
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ablation tables (validation split, ablation seeds) and their paper claims."""
    tables: dict[str, Any] = {}
    claims: list[dict[str, Any]] = []
    variants = _ablation_specs(selected, grid)
    values: dict[tuple[str, str, Any], dict[str, dict[int, float]]] = {}
    for name, rows in variants.items():
        table = []
        for method, value, template in rows:
            per_metric = {k: {s: v for s, v in _by_seed(runs, template, k).items()
                              if s in grid.ablation_seeds} for k, _ in METRICS}
            values[(name, method, value)] = per_metric
            if per_metric[METRICS[0][0]]:
                table.append({"method": method, "value": value,
                              **{k: _stats(list(v.values())) for k, v in per_metric.items()}})
        tables[name] = table

    def claim(table: str, text: str, setting: str, a: tuple[str, str, Any],
              b: tuple[str, str, Any]) -> None:
        if a not in values or b not in values:
            return
        for key, label in METRICS:
            if key not in CLAIM_METRICS:
                continue
            p = paired(values[a][key], values[b][key])
            if p["n"]:
                claims.append({"table": table, "claim": text, "setting": setting,
                               "metric": label, "measured": measured_text(p),
                               "verdict": p["verdict"]})

    val = f"validation split, seeds {list(grid.ablation_seeds)}"
    for b in grid.ablation_batch_sizes:
        claim("Table 4", f"MUSIC >= VICReg at batch size {b}", val,
              ("batch_size", "music_blocks", b), ("batch_size", "vicreg", b))
    for depth in grid.ablation_depths[1:]:
        claim("Table 5", f"MUSIC: projector depth {grid.ablation_depths[0]} >= depth {depth}",
              val, ("projector_depth", "music_blocks", grid.ablation_depths[0]),
              ("projector_depth", "music_blocks", depth))
    claim("Table 6", "MUSIC: entropy + invariance >= entropy only", val,
          ("invariance", "music_blocks", "entropy + invariance"),
          ("invariance", "music_entropy_only", "entropy only"))
    ks = [k for _, k, _ in variants["segment_dim"]]
    for key, label in METRICS:
        if key not in CLAIM_METRICS:
            continue
        means = {k: values[("segment_dim", "music_blocks", k)][key] for k in ks}
        if all(means.values()):
            m = {k: 100 * float(np.mean(list(v.values()))) for k, v in means.items()}
            spread = max(m.values()) - min(m.values())
            claims.append({
                "table": "Table 7", "claim": "MUSIC is not sensitive to segment_dim "
                "(range of means over K <= 1.5 pts; the paper's range is 1.6 pts top-1)",
                "setting": val + f", D={selected['music_blocks']['d']}", "metric": label,
                "measured": "; ".join(f"K={k}: {v:.1f}" for k, v in m.items())
                + f" (range {spread:.1f})",
                "verdict": "reproduced" if spread <= 1.5 else "not reproduced"})
    for d in grid.ablation_dims:
        claim("Table 8", f"MUSIC >= VICReg at D={d}", val, ("d", "music_blocks", d),
              ("d", "vicreg", d))
    return tables, claims

