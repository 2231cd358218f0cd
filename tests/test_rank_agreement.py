"""Every rank fails together, and what changes between steps just works (gloo, 2-3 ranks).

Each scenario runs in fresh processes with a 10 s collective timeout and a join deadline, so a
hang fails in seconds: a batch size that changes between steps (equal, then unequal, then
equal again), NaN on one rank with ``check_finite=True``, a rank without rows under
``uneven_batches=True``, one rank's invalid view, ranks with different feature sizes;
``uneven_batches=True`` against one process on the concatenated batch (values and DDP
gradients, 2 and 3 ranks); ``torch.compile(fullgraph=True)`` with a new batch size, at world
size 1 and 2, and with ``check_finite``; a stop-gradient view (no gradient product for it).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from music_loss import MUSICLoss
from tests.tolerances import DTYPE_TOL, relative_error

pytestmark = pytest.mark.distributed

IN, K, S = 6, 4, 3
#: Seconds a collective may wait before gloo gives up, and the spawner's deadline.
COLLECTIVE_TIMEOUT, JOIN_TIMEOUT = 10, 150


def _entry(scenario, rank: int, world: int, out_dir: str, args: tuple) -> None:
    sys.path.insert(0, os.getcwd())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    result = scenario(rank, world, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn(scenario, world: int, tmp_path, *args) -> list[dict]:
    """Run ``scenario(rank, world, *args)`` on ``world`` gloo ranks; fail fast on a hang."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    context = mp.get_context("spawn")
    procs = [context.Process(target=_entry, args=(scenario, r, world, str(tmp_path), args))
             for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert not hung, f"ranks {hung} still running after {JOIN_TIMEOUT} s (a hang)"
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * world, f"rank exit codes {codes} (a crash inside a collective?)"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _attempt(fn) -> dict:
    """Run ``fn``; record its value or its error, and the seconds it took."""
    start = time.monotonic()
    try:
        value = fn()
        return {"ok": True, "value": value, "seconds": time.monotonic() - start}
    except Exception as err:  # noqa: BLE001 - the scenario records what each rank saw
        return {"ok": False, "error": type(err).__name__, "message": str(err),
                "seconds": time.monotonic() - start, "trace": traceback.format_exc()}


def _views(n: int, seed: int = 0, dim: int = S * K) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return z1, z1 + 0.3 * torch.randn(n, dim, generator=gen, dtype=torch.float64)


def _loss(loss_fn, n: int, seed: int = 0, **kwargs) -> float:
    z1, z2 = _views(n, seed, **kwargs)
    return float(loss_fn(z1, z2))


def _same_error_everywhere(ranks: list[dict], key: str, *needles: str) -> None:
    for rank, result in enumerate(ranks):
        got = result[key]
        assert not got["ok"], (rank, key, got)
        assert got["error"] == "ValueError", (rank, key, got["trace"])
        assert got["seconds"] < COLLECTIVE_TIMEOUT / 2, (rank, key, got["seconds"])
        for needle in needles:
            assert needle in got["message"], (rank, key, got["message"])


# ---------------------------------------------------------------------------------------
# Errors that depend on one rank's data reach every rank, at once
# ---------------------------------------------------------------------------------------
def _sizes_change(rank: int, world: int) -> dict:
    loss_fn = MUSICLoss(K, gather_distributed=True, backend="torch")
    steps = {"4,4": [4, 4], "4,3": [4, 3], "3,3": [3, 3], "5,5": [5, 5]}
    return {name: _attempt(lambda s=sizes: _loss(loss_fn, s[rank], seed=rank))
            for name, sizes in steps.items()}


def test_batch_sizes_that_change_between_steps(tmp_path):
    """Equal sizes that change just work; unequal sizes at a later step raise the same
    clear error on every rank within seconds, and the next equal step works again."""
    ranks = _spawn(_sizes_change, 2, tmp_path)
    _same_error_everywhere(ranks, "4,3", "[4, 3]", "uneven_batches=True")
    for name in ("4,4", "3,3", "5,5"):
        assert all(r[name]["ok"] for r in ranks), [r[name] for r in ranks]


def _one_rank_bad(rank: int, world: int) -> dict:
    n = 4
    out = {}
    z1, z2 = _views(n, seed=rank)
    if rank == 1:
        z1 = z1.clone()
        z1[2, 5] = float("nan")
    checked = MUSICLoss(K, gather_distributed=True, backend="torch", check_finite=True)
    out["nan"] = _attempt(lambda: float(checked(z1, z2)))
    uneven = MUSICLoss(K, gather_distributed=True, backend="torch", uneven_batches=True)
    rows = 0 if rank == 1 else n
    out["empty"] = _attempt(lambda: _loss(uneven, rows, seed=rank))
    plain = MUSICLoss(K, gather_distributed=True, backend="torch")
    out["bad_dim"] = _attempt(lambda: _loss(plain, n, rank, dim=S * K + (rank == 1)))
    out["other_dim"] = _attempt(lambda: _loss(plain, n, rank, dim=(S + rank) * K))
    out["after"] = _attempt(lambda: _loss(plain, n, seed=rank))
    return out


def test_one_ranks_bad_input_fails_every_rank(tmp_path):
    ranks = _spawn(_one_rank_bad, 2, tmp_path)
    _same_error_everywhere(ranks, "nan", "NaN", "rank(s) [1]")
    _same_error_everywhere(ranks, "empty", "rank(s) [1] hold no rows")
    # The rank with the bad view raises its own error; the others name that rank.
    _same_error_everywhere(ranks, "bad_dim")
    assert "not a multiple of segment_dim" in ranks[1]["bad_dim"]["message"]
    assert "rank(s) [1]" in ranks[0]["bad_dim"]["message"]
    _same_error_everywhere(ranks, "other_dim", "feature size [12, 16]")
    assert all(r["after"]["ok"] for r in ranks)


# ---------------------------------------------------------------------------------------
# uneven_batches=True: exactly one process on the concatenated batch
# ---------------------------------------------------------------------------------------
def _data(n: int):
    gen = torch.Generator().manual_seed(n)
    x1 = torch.randn(n, IN, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(n, IN, generator=gen, dtype=torch.float64)
    model = nn.Linear(IN, S * K).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(model.bias.shape, generator=gen, dtype=torch.float64))
    return x1, x2, model


def _uneven(rank: int, world: int, sizes: list[int], backends: tuple[str, ...]) -> dict:
    x1, x2, base = _data(sum(sizes))
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    out = {}
    for backend in backends:
        for shard in (True, False):
            model = DistributedDataParallel(base)
            model.zero_grad()
            loss_fn = MUSICLoss(K, gather_distributed=True, backend=backend, shard=shard,
                                uneven_batches=True)
            terms = loss_fn(model(x1[rows]), model(x2[rows]), return_terms=True)
            terms.loss.backward()
            out[(backend, shard)] = {"terms": [t.detach().clone() for t in terms],
                                     "grads": [p.grad.clone() for p in model.parameters()]}
    return out


@pytest.mark.parametrize("sizes", [[4, 3], [4, 3, 5]], ids=["2 ranks", "3 ranks"])
def test_uneven_batches_match_one_process(tmp_path, sizes):
    """DDP-averaged gradients and the mean of the ranks' losses equal one process on the
    concatenated batch; each rank returns the global entropy part plus its invariance term
    weighted by its share of the global batch (``n_r W / N``)."""
    backends = ("reference", "torch")
    ranks = _spawn(_uneven, len(sizes), tmp_path, sizes, backends)
    x1, x2, base = _data(sum(sizes))
    tol = DTYPE_TOL[torch.float64]
    world, total = len(sizes), sum(sizes)
    for backend in backends:
        base.zero_grad()
        single = MUSICLoss(K, backend=backend)(base(x1), base(x2), return_terms=True)
        single.loss.backward()
        inv_only = MUSICLoss(K, backend="reference", diag_weight=0.0, off_weight=0.0)
        for shard in (True, False):
            got = [r[(backend, shard)] for r in ranks]
            mean_loss = sum(g["terms"][0] for g in got) / world
            assert relative_error(mean_loss, single.loss) <= tol.loss, (backend, shard)
            start = 0
            for rank, (g, n) in enumerate(zip(got, sizes)):
                _, diag, off, inv = g["terms"]
                assert relative_error(diag + off, single.diag + single.off) <= tol.loss
                rows = slice(start, start + n)
                want_inv = inv_only(base(x1[rows]), base(x2[rows])) * n * world / total
                assert relative_error(inv, want_inv) <= tol.loss, (backend, shard, rank)
                start += n
                for got_p, want_p in zip(g["grads"], (p.grad for p in base.parameters())):
                    err = relative_error(got_p, want_p)
                    assert err <= tol.grad, (backend, shard, rank, err)


# ---------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): new batch sizes, world size 1, check_finite
# ---------------------------------------------------------------------------------------
def _compiled(rank: int, world: int) -> dict:
    torch._dynamo.reset()
    loss_fn = MUSICLoss(K, gather_distributed=True, backend="torch")
    step = torch.compile(lambda a, b: loss_fn(a, b), fullgraph=True)
    out = {}
    for n in (3, 5):  # compiled at the first call, then a new (equal) batch size
        z1, z2 = _views(n, seed=rank)
        out[n] = _attempt(lambda a=z1, b=z2: (float(step(a, b)), float(loss_fn(a, b))))
    checked = MUSICLoss(K, gather_distributed=True, backend="torch", check_finite=True)
    checked_step = torch.compile(lambda a, b: checked(a, b), fullgraph=True)
    z1, z2 = _views(4, seed=rank)
    out["finite"] = _attempt(lambda: float(checked_step(z1, z2)))
    bad = z1.clone()
    if rank == world - 1:
        bad[0, 0] = float("inf")
    out["nonfinite"] = _attempt(lambda: float(checked_step(bad, z2)))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_compiled_step_takes_new_batch_sizes(tmp_path, world):
    """Compiled at the first call (world size 1 included), a new equal batch size recompiles
    and matches eager; ``check_finite`` compiles to a device-side assertion that stops every
    rank on a non-finite value."""
    ranks = _spawn(_compiled, world, tmp_path)
    tol = DTYPE_TOL[torch.float64]
    for result in ranks:
        for n in (3, 5):
            assert result[n]["ok"], result[n]["trace"]
            compiled, eager = result[n]["value"]
            assert relative_error(torch.tensor(compiled), torch.tensor(eager)) <= tol.loss
        assert result["finite"]["ok"], result["finite"]["trace"]
        bad = result["nonfinite"]
        assert not bad["ok"] and "NaN or inf" in bad["message"], bad
        assert bad["seconds"] < COLLECTIVE_TIMEOUT / 2, bad


# ---------------------------------------------------------------------------------------
# A stop-gradient view costs no gradient product, distributed as single-process
# ---------------------------------------------------------------------------------------
def _matmul_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _stop_gradient(rank: int, world: int) -> dict:
    n = 16
    z1, z2 = _views(n, seed=rank, dim=8 * K)
    out = {}
    for gather in (True, False):
        loss_fn = MUSICLoss(K, gather_distributed=gather, backend="reference", shard=False)
        for name, needs in (("both", (True, True)), ("stop", (True, False))):
            a = z1.clone().requires_grad_(needs[0])
            b = z2.clone().requires_grad_(needs[1])

            def step(a=a, b=b, loss_fn=loss_fn):
                loss_fn(a, b).backward()
            out[(gather, name)] = _matmul_flops(step)
    return out


def test_stop_gradient_view_skips_its_product_distributed(tmp_path):
    ranks = _spawn(_stop_gradient, 2, tmp_path)
    for result in ranks:
        # Single process: one of the three N x D x D products is skipped.
        assert result[(False, "stop")] < result[(False, "both")]
        saved_single = result[(False, "both")] - result[(False, "stop")]
        # Gathered: the same product is skipped (its FLOPs scale with the global batch).
        saved_gathered = result[(True, "both")] - result[(True, "stop")]
        assert saved_gathered >= 2 * saved_single * 0.99, result
