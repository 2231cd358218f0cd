"""Smoke test of the digits study (benchmarks/quality): a tiny end-to-end run writes a
results file with the documented schema, a Markdown report and plots, and the pieces
(augmentation, plan, probes) do what they say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.quality import digits, report
from benchmarks.quality.data import Augment, load_split
from benchmarks.quality.train import TrainConfig, evaluate_baseline, few_label_indices

RECORD_KEYS = {"method", "seed", "segment_dim", "d", "epochs", "linear_probe_acc",
               "linear_probe_few_acc", "knn_acc", "studies"}


def test_tiny_study_end_to_end(tmp_path: Path) -> None:
    data = digits.run([
        "--studies", "main,segment_dim,dim", "--methods", "music_blocks,vicreg",
        "--epochs", "1", "--batch-size", "128", "--seeds", "0", "--dim", "32",
        "--segment-dim", "8", "--segment-dims", "8", "16", "--dims", "32",
        "--out-dir", str(tmp_path), "--name", "smoke", "--no-progress", "--threads", "1",
    ])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["meta"]["complete"] is True
    assert saved["records"] == data["records"]
    methods = {r["method"] for r in saved["records"]}
    assert methods == {"music_blocks", "vicreg", "random_init", "raw_pixels"}
    for record in saved["records"]:
        assert set(record) >= RECORD_KEYS
        for key in ("linear_probe_acc", "linear_probe_few_acc", "knn_acc"):
            assert 0.0 <= record[key] <= 1.0
    # Deduplicated: the (music_blocks, K=8, D=32) run serves all three studies.
    shared = [r for r in saved["records"] if r["method"] == "music_blocks"
              and r["segment_dim"] == 8 and r["d"] == 32]
    assert len(shared) == 1 and set(shared[0]["studies"]) == {"main", "segment_dim", "dim"}
    music_curve = next(c for c in saved["curves"] if c["method"] == "music_blocks")
    point = music_curve["points"][-1]
    assert {"loss", "usage_entropy", "confidence", "segment_mi", "agreement", "knn_acc"} <= set(
        point)
    # Raw pixels get the accuracy a plain logistic regression on digits is known to reach.
    raw = next(r for r in saved["records"] if r["method"] == "raw_pixels")
    assert raw["linear_probe_acc"] > 0.9
    for suffix in ("accuracy", "segment-dim", "dim", "curves"):
        assert (tmp_path / f"smoke-{suffix}.png").stat().st_size > 1000
    text = (tmp_path / "smoke.md").read_text()
    assert "The paper's orderings" in text and "raw pixels" in text
    # The report re-renders from the JSON alone.
    report.main([str(tmp_path / "smoke.json")])


def test_augment_is_seeded_and_changes_images() -> None:
    images = load_split(0).train_images[:16]
    a = Augment()(images, torch.Generator().manual_seed(0))
    b = Augment()(images, torch.Generator().manual_seed(0))
    c = Augment()(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert (a - images).abs().mean() > 0.01


def test_split_is_fixed_by_seed_and_stratified() -> None:
    s0, s0b, s1 = load_split(0), load_split(0), load_split(1)
    assert np.array_equal(s0.test_labels, s0b.test_labels)
    assert not torch.equal(s0.test_images, s1.test_images)
    assert np.bincount(s0.test_labels).min() >= 50  # every class held out


def test_few_label_indices_take_k_per_class() -> None:
    labels = load_split(0).train_labels
    idx = few_label_indices(labels, 5, np.random.default_rng(0))
    assert np.array_equal(np.bincount(labels[idx]), np.full(10, 5))


def test_probes_separate_signal_from_noise() -> None:
    split = load_split(0)
    cfg = TrainConfig(few_label_draws=1)
    raw = evaluate_baseline("raw_pixels", split, cfg, seed=0)
    assert raw["knn_acc"] > 0.95
    # Labels shuffled: the same probes fall to chance.
    rng = np.random.default_rng(0)
    shuffled = type(split)(split.train_images, rng.permutation(split.train_labels),
                           split.test_images, split.test_labels)
    assert evaluate_baseline("raw_pixels", shuffled, cfg, seed=0)["knn_acc"] < 0.25
