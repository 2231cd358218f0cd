"""The ImageNet example (``examples/imagenet``): its pieces, its errors, and its parity run.

``test_check_parity`` is the CI twin of ``check_parity.py --require-triton``: the real
pipeline on generated JPEGs, torch vs reference (float64), triton vs reference (float32; a
skipped Triton leg fails), 2 gloo ranks vs 1 process for the three losses (float64), and a
pre-empted + resumed run vs an uninterrupted one. ``test_imagenet_parity_sensitivity.py``
shows that each of those comparisons fails on an injected error.
"""

from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "imagenet"
sys.path.insert(0, str(EXAMPLE))
sys.path.insert(0, str(ROOT))

import imagenet_common  # noqa: E402
import imagenet_lars  # noqa: E402
import imagenet_losses  # noqa: E402
import linear_eval  # noqa: E402
import pretrain  # noqa: E402
from imagenet_common import (  # noqa: E402
    DatasetError,
    GlobalBatchSampler,
    SyntheticImages,
    TwinEncoder,
    TwoViewDataset,
    write_image_folder,
)

from benchmarks.baselines import barlow_twins_loss, vicreg_loss  # noqa: E402


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------
# Missing or malformed dataset: a clear error, before any process group or GPU.
# ---------------------------------------------------------------------------------------
def _malformed(tmp_path: Path, case: str) -> Path:
    root = tmp_path / "imagenet"
    if case == "missing":
        return root
    if case == "file":
        root.write_text("not a folder")
        return root
    root.mkdir()
    if case == "no-train":
        (root / "val").mkdir()
    elif case == "no-classes":
        (root / "train").mkdir()
        (root / "train" / "readme.txt").write_text("x")
    elif case == "empty-class":
        write_image_folder(root / "train", num_classes=2, per_class=1, size=8)
        (root / "train" / "class_empty").mkdir()
        (root / "train" / "class_empty" / "notes.txt").write_text("x")
    return root


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("no-train", "has no 'train' folder"),
    ("no-classes", "has no class sub-folders"),
    ("empty-class", "hold no image files"),
])
def test_bad_dataset_is_a_clear_error_before_any_setup(tmp_path, monkeypatch, case, message):
    def no_setup(*args, **kwargs):
        raise AssertionError("distributed/device set-up ran before the dataset check")

    monkeypatch.setattr(pretrain, "init_distributed", no_setup)
    monkeypatch.setattr(linear_eval, "init_distributed", no_setup)
    data = _malformed(tmp_path, case)
    with pytest.raises(DatasetError, match=message) as err:
        pretrain.main(["--data", str(data), "--device", "cpu"])
    assert "ImageNet layout" in str(err.value)
    with pytest.raises(DatasetError, match=message):
        linear_eval.main(["--data", str(data), "--pretrained", str(tmp_path / "x.pt")])


def test_bad_dataset_cli_exits_with_message_not_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE / "pretrain.py"), "--data",
                           str(tmp_path / "nowhere")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "pretrain.py: error: --data" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --data"):
        pretrain.main(["--device", "cpu"])
    with pytest.raises(ValueError, match="not a multiple of --segment-dim"):
        pretrain.main(["--synthetic", "--projector", "64-50", "--device", "cpu"])
    with pytest.raises(ValueError, match="--resume .* is not a file"):
        pretrain.main(["--synthetic", "--resume", str(tmp_path / "nope.pt"), "--device", "cpu"])
    with pytest.raises(ValueError, match="--pretrained .* is not a file"):
        write_image_folder(tmp_path / "d" / "train", 1, 1, 8)
        write_image_folder(tmp_path / "d" / "val", 1, 1, 8)
        linear_eval.main(["--data", str(tmp_path / "d"), "--pretrained", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="not a multiple of the 3 processes"):
        GlobalBatchSampler(100, global_batch=8, rank=0, world_size=3, seed=0)


# ---------------------------------------------------------------------------------------
# Optimiser and schedule: the VICReg / Barlow Twins LARS, the paper's schedule.
# ---------------------------------------------------------------------------------------
def test_lars_follows_its_formula_and_skips_biases_and_norms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    lr, wd, momentum, eta = 0.7, 1e-2, 0.9, 0.05
    opt = imagenet_lars.LARS(imagenet_lars.lars_param_groups(model), lr=lr, weight_decay=wd,
                             momentum=momentum, eta=eta)
    params = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    buffers = {name: torch.zeros_like(p) for name, p in params.items()}
    for _ in range(3):
        grads = {name: torch.randn_like(p) for name, p in params.items()}
        for name, p in model.named_parameters():
            p.grad = grads[name].float()
        opt.step()
        for name, w in params.items():  # the formula, written out in float64
            g = grads[name]
            if name == "0.weight":  # the only matrix: decayed and trust-scaled
                g = g + wd * w
                g = g * (eta * w.norm() / g.norm())
            buffers[name] = momentum * buffers[name] + g
            params[name] = w - lr * buffers[name]
    for name, p in model.named_parameters():
        assert _relative(p.detach().double(), params[name]) < 1e-6, name


def test_lars_trust_ratio_is_one_for_zero_norms():
    w = torch.nn.Parameter(torch.zeros(3, 3))  # e.g. a zero-initialised residual weight
    opt = imagenet_lars.LARS([w], lr=0.5, weight_decay=0.0, momentum=0.0, eta=0.001)
    w.grad = torch.ones(3, 3)
    opt.step()
    assert torch.equal(w.detach(), torch.full((3, 3), -0.5))


def test_schedule_warms_up_from_zero_then_cosine_to_the_final_value():
    peak = imagenet_lars.peak_learning_rate(2048, 0.6)
    assert math.isclose(peak, 4.8)
    lr = [imagenet_lars.learning_rate(s, total_steps=100, warmup_steps=10, peak=peak,
                                      final=0.002) for s in range(101)]
    assert lr[0] == 0.0 and math.isclose(lr[5], peak / 2) and math.isclose(lr[10], peak)
    assert math.isclose(lr[100], 0.002)
    assert math.isclose(lr[55], (peak + 0.002) / 2)  # cosine midpoint
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


# ---------------------------------------------------------------------------------------
# Data: per-sample seeded views, split-independent global batches.
# ---------------------------------------------------------------------------------------
def test_views_depend_only_on_seed_epoch_and_index():
    data = TwoViewDataset(SyntheticImages(6, size=40), image_size=24, seed=3)
    torch.manual_seed(123)  # the global generator must not matter
    a = data[(2, 1)]
    torch.manual_seed(456)
    b = data[(2, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], data[(2, 0)][0])  # a new epoch re-draws the augmentation
    assert not torch.equal(a[0], a[1])  # two different views


def test_ranks_slice_the_same_global_batches_as_one_process():
    single = list(GlobalBatchSampler(37, global_batch=8, rank=0, world_size=1, seed=5))
    ranks = [list(GlobalBatchSampler(37, global_batch=8, rank=r, world_size=2, seed=5))
             for r in range(2)]
    assert len(single) == 32  # 4 full global batches, the rest dropped
    for step in range(4):
        glued = ranks[0][4 * step:4 * step + 4] + ranks[1][4 * step:4 * step + 4]
        assert glued == single[8 * step:8 * step + 8]
    sampler = GlobalBatchSampler(37, global_batch=8, rank=0, world_size=1, seed=5)
    sampler.set_epoch(0, start_step=3)  # resuming mid-epoch skips the trained batches
    assert list(sampler) == single[24:]
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in single]


# ---------------------------------------------------------------------------------------
# The peers' multi-GPU forms: equal to the official single-process formulas.
# ---------------------------------------------------------------------------------------
def test_peer_losses_equal_single_process_formulas_on_one_process():
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = (z1.detach() + 0.5 * torch.randn(32, 24, generator=gen, dtype=torch.float64))
    z2.requires_grad_()
    for mine, official in ((imagenet_losses.barlow_twins_loss_distributed, barlow_twins_loss),
                           (imagenet_losses.vicreg_loss_distributed, vicreg_loss)):
        loss, terms = mine(z1, z2)
        want = official(z1, z2)
        assert abs(float(loss.detach() - want.detach())) <= 1e-12 * abs(float(want.detach()))
        assert math.isclose(sum(float(t.detach()) for t in terms.values()), float(loss.detach()),
                            rel_tol=1e-9)
        g_mine = torch.autograd.grad(loss, (z1, z2))
        g_want = torch.autograd.grad(want, (z1, z2))
        for a, b in zip(g_mine, g_want):
            assert _relative(a, b) < 1e-12


def _peer_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 16, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(12, 16, generator=gen, dtype=torch.float64)
    rows = slice(6 * rank, 6 * rank + 6)
    results = {}
    for name in ("barlow-twins", "vicreg", "music"):
        a = z1[rows].clone().requires_grad_()
        b = z2[rows].clone().requires_grad_()
        crit = imagenet_losses.Criterion(name, segment_dim=4, backend="reference")
        loss, _ = crit(a, b)
        loss.backward()
        results[name] = (loss.detach(), a.grad, b.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_peer_losses_on_two_gloo_ranks_train_like_one_process(tmp_path):
    """Rank-mean loss = one-process loss; each rank's row gradient = world x the one-process
    gradient of its rows (so DDP's averaging yields the one-process parameter gradient)."""
    mp.spawn(_peer_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = (z1.detach() + 0.5 * torch.randn(12, 16, generator=gen, dtype=torch.float64))
    z2.requires_grad_()
    for name in ("barlow-twins", "vicreg", "music"):
        loss, _ = imagenet_losses.Criterion(name, segment_dim=4, backend="reference")(z1, z2)
        g1, g2 = torch.autograd.grad(loss, (z1, z2))
        mean_loss = (ranks[0][name][0] + ranks[1][name][0]) / 2
        loss = loss.detach()
        assert abs(float(mean_loss - loss)) <= 1e-9 * abs(float(loss)), name
        got1 = torch.cat([ranks[0][name][1], ranks[1][name][1]]) / 2
        got2 = torch.cat([ranks[0][name][2], ranks[1][name][2]]) / 2
        assert _relative(got1, g1) < 1e-9 and _relative(got2, g2) < 1e-9, name


# ---------------------------------------------------------------------------------------
# The GPU benchmark entry point, at toy shapes on CPU (bf16 autocast, channels_last).
# ---------------------------------------------------------------------------------------
def test_bench_synthetic_runs_the_pipeline_per_backend(tmp_path):
    import bench_synthetic

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = bench_synthetic.main([
            "--device", "cpu", "--arch", "resnet18", "--projector", "256-160",
            "--image-size", "32", "--batch-size", "8", "--steps", "3",
            "--configs", "music-torch,music-reference,vicreg",
            "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [r["config"] for r in results] == ["music-torch", "music-reference", "vicreg"]
    for r in results:
        assert "error" not in r, r
        assert r["steps"] == 3 and r["amp"] == "none" and r["images_per_s"] > 0
        assert 0 < r["loss_share"] < 1
    # Same seed, same pipeline: the two MUSIC backends agree on the losses they logged.
    assert math.isclose(results[0]["last"]["loss"], results[1]["last"]["loss"], rel_tol=1e-5)
    assert json.loads((tmp_path / "results.json").read_text())[0]["config"] == "music-torch"


def test_pretrain_bf16_channels_last_on_device_batches(tmp_path):
    argv = ["--synthetic", "--synthetic-on-device", "--synthetic-images", "16", "--device",
            "cpu", "--amp", "bf16", "--channels-last", "on", "--arch", "resnet18",
            "--projector", "256-160", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
            "--loss", "barlow-twins", "--output-dir", str(tmp_path), "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = pretrain.main(argv)
        written = (tmp_path / "summary.json").read_text()
        again = pretrain.main(argv)  # a finished job, run again: trains nothing
    finally:
        torch.set_num_threads(threads)
    assert summary["amp"] == "bf16" and summary["finished"] and summary["steps"] == 2
    assert math.isfinite(summary["last"]["loss"]) and summary["images_per_s"] > 0
    assert (tmp_path / "backbone.pt").exists() and (tmp_path / "checkpoint.pt").exists()
    # The finished run's summary is kept, not rewritten with nulls.
    assert (tmp_path / "summary.json").read_text() == written
    assert again == json.loads(written)


def test_pretrain_deterministic_mode_is_on_while_training_and_restored(tmp_path, monkeypatch):
    seen = []

    class Spy(imagenet_losses.Criterion):
        def __call__(self, z1, z2):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().__call__(z1, z2)

    monkeypatch.setattr(pretrain, "Criterion", Spy)
    before = torch.are_deterministic_algorithms_enabled()
    summary = pretrain.main([
        "--synthetic", "--synthetic-images", "8", "--synthetic-resolution", "36", "--device",
        "cpu", "--arch", "resnet18", "--projector", "64-40", "--segment-dim", "8",
        "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0",
        "--deterministic", "--no-save", "--output-dir", str(tmp_path), "--no-progress"])
    assert seen == [True, True] and summary["deterministic"]
    assert torch.are_deterministic_algorithms_enabled() == before


def test_final_learning_rate_is_a_ratio_of_the_peak_by_default(tmp_path):
    args = pretrain.build_parser().parse_args(["--synthetic"])
    assert args.final_lr_ratio == 0.001 and args.final_lr is None
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "pretrain.py"), "--synthetic", "--synthetic-images",
         "8", "--synthetic-resolution", "36", "--device", "cpu", "--arch", "resnet18",
         "--projector", "64-40", "--segment-dim", "8", "--image-size", "32", "--batch-size",
         "4", "--epochs", "1", "--workers", "0", "--no-save", "--stop-after-steps", "1",
         "--output-dir", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    # batch 4: peak 4 / 256 x 0.6 = 0.009375; end 0.001 x peak.
    assert "lr peak 0.009375 -> 9.375e-06" in done.stderr


# ---------------------------------------------------------------------------------------
# Checkpoints are loaded with weights_only=True: a pickle that runs code is refused.
# ---------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_runs_code_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, evil)
    torch.load(evil, weights_only=False)  # the control: the payload does run when trusted
    assert marker.exists()
    marker.unlink()
    with pytest.raises(imagenet_common.CheckpointError, match=r"evil\.pt holds objects outside "
                                                                "the checkpoint allow-list"):
        imagenet_common.load_checkpoint(evil)
    with pytest.raises(imagenet_common.CheckpointError, match="evil.pt"):
        linear_eval.load_backbone(evil, "resnet18", "batch")
    with pytest.raises(imagenet_common.CheckpointError, match="evil.pt"):
        pretrain.main(["--synthetic", "--synthetic-images", "8", "--device", "cpu",
                       "--arch", "resnet18", "--projector", "64-40", "--segment-dim", "8",
                       "--image-size", "32", "--batch-size", "4", "--workers", "0",
                       "--resume", str(evil), "--output-dir", str(tmp_path / "out")])
    assert not marker.exists()


def test_checkpoints_with_numpy_random_state_load_with_weights_only(tmp_path):
    import numpy as np

    state = {"rng": [imagenet_common.rng_state()], "step": 2}
    imagenet_common.save_atomic(state, tmp_path / "checkpoint.pt")
    loaded = imagenet_common.load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded["step"] == 2
    assert np.array_equal(loaded["rng"][0]["numpy"][1], state["rng"][0]["numpy"][1])
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


# ---------------------------------------------------------------------------------------
# Linear evaluation.
# ---------------------------------------------------------------------------------------
def test_linear_eval_loads_every_backbone_format(tmp_path):
    torch.manual_seed(0)
    twin = TwinEncoder("resnet18", "64-40", "group")
    want = twin.backbone.state_dict()
    files = {
        "backbone.pt": {"arch": "resnet18", "norm": "group", "state_dict": want},
        "checkpoint.pt": {"model": twin.state_dict(),
                          "args": {"arch": "resnet18", "norm": "group"}},
    }
    for name, blob in files.items():
        torch.save(blob, tmp_path / name)
        net, width = linear_eval.load_backbone(tmp_path / name, None, None)
        assert width == 512
        assert all(torch.equal(net.state_dict()[k], v) for k, v in want.items()), name
    plain = TwinEncoder("resnet18", "64-40", "batch").backbone.state_dict()
    torch.save(plain, tmp_path / "torchvision.pth")
    net, _ = linear_eval.load_backbone(tmp_path / "torchvision.pth", "resnet18", "batch")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in plain.items())


def test_linear_eval_runs_and_reports_top1_top5(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "train", num_classes=6, per_class=5, size=36)
    write_image_folder(data / "val", num_classes=6, per_class=2, size=36, seed=1)
    twin = TwinEncoder("resnet18", "64-40", "batch")
    torch.save({"arch": "resnet18", "norm": "batch",
                "state_dict": twin.backbone.state_dict()}, tmp_path / "backbone.pt")
    summary = linear_eval.main([
        "--data", str(data), "--pretrained", str(tmp_path / "backbone.pt"), "--epochs", "1",
        "--batch-size", "10", "--image-size", "32", "--resize", "36", "--workers", "0",
        "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--no-progress",
        "--train-percent", "10"])
    assert summary["train_images"] == 6  # ceil(10 % of 5) = 1 per class
    assert summary["val_images"] == 12
    assert 0 <= summary["best_top1"] <= summary["best_top5"] <= 100
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    # Resuming keeps the best accuracy so far: plant a best of 99 % in the checkpoint.
    ckpt = imagenet_common.load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert ckpt["best"]["top1"] == summary["best_top1"]
    ckpt["best"] = {"top1": 99.0, "top5": 99.5}
    torch.save(ckpt, tmp_path / "out" / "checkpoint.pt")
    argv = ["--data", str(data), "--pretrained", str(tmp_path / "backbone.pt"), "--epochs", "2",
            "--batch-size", "10", "--image-size", "32", "--resize", "36", "--workers", "0",
            "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--no-progress",
            "--train-percent", "10"]
    resumed = linear_eval.main(argv)
    assert resumed["best_top1"] == 99.0 and resumed["best_top5"] == 99.5
    assert resumed["final"]["epoch"] == 2
    written = (tmp_path / "out" / "summary.json").read_text()
    assert linear_eval.main(argv) == resumed  # finished: the summary is kept
    assert (tmp_path / "out" / "summary.json").read_text() == written


def test_semi_supervised_defaults_are_barlow_twins_settings():
    finetune = linear_eval.resolve_defaults(linear_eval.build_parser().parse_args(
        ["--data", "d", "--pretrained", "p", "--weights", "finetune"]))
    assert (finetune.epochs, finetune.lr_backbone, finetune.lr_head,
            finetune.weight_decay) == (20, 0.005, 0.5, 0.0)
    probe = linear_eval.resolve_defaults(linear_eval.build_parser().parse_args(
        ["--data", "d", "--pretrained", "p", "--lr-head", "0.1"]))
    assert (probe.epochs, probe.lr_head, probe.weight_decay) == (100, 0.1, 1e-6)


def test_example_doctests():
    import parity_mutations

    for module in (imagenet_common, imagenet_lars, imagenet_losses, linear_eval,
                   parity_mutations):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


# ---------------------------------------------------------------------------------------
# The full-pipeline parity check (the CI twin of check_parity.py).
# ---------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_check_parity(tmp_path):
    """Every leg, Triton required (CI has the interpreter): a skipped leg fails here."""
    report = tmp_path / "parity.json"
    # No --workdir: the script removes its temporary folder (about 2 GB of checkpoints).
    done = subprocess.run([sys.executable, str(EXAMPLE / "check_parity.py"), "--json",
                           str(report), "--require-triton"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(report.read_text())
    names = [r["comparison"] for r in results["results"]]
    assert results["ok"] and all(r["ok"] for r in results["results"])
    assert not results["notes"], results["notes"]  # nothing skipped
    assert any(n.startswith("torch vs reference (1 process, float64") for n in names)
    assert any(n.startswith("triton (interpreter) vs reference") for n in names)
    for loss in ("music", "barlow-twins", "vicreg"):
        assert any(n.startswith(f"{loss}: 2 gloo ranks") for n in names)
    resumed = [r for r in results["results"] if "resumed at step 3" in r["comparison"]]
    assert len(resumed) == 2
    for r in resumed:
        assert r["param_rel_diff"] == 0.0 and r["loss_rel_diff"] == 0.0 and r["steps"] == 4
