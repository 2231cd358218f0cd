"""Sharded loss (``shard=True``) on 2, 3 and 4 gloo ranks against one process and
against ``shard=False``.

Each rank owns the rows ``[s0 K, s1 K)`` of ``P``; S divisible by W, not divisible, and
S < W (a rank owning no segment). Checked on every rank: the loss and its three parts equal
the unsharded rank's; the mean loss over ranks equals the single-process loss; the gradient of
the rank's own rows of both views equals the unsharded one, and DDP's averaged parameter
gradients equal single-process training. float64 (``reference``, ``torch``); the Triton
backend in float32 under the interpreter (slow).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from music_loss import MUSICLoss
from tests.tolerances import DTYPE_TOL, relative_error

pytestmark = pytest.mark.distributed

IN, K, ROWS_PER_RANK = 6, 4, 3


def _data(world: int, segments: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(10 * world + segments)
    n = ROWS_PER_RANK * world
    x1 = torch.randn(n, IN, generator=gen, dtype=dtype)
    x2 = x1 + 0.3 * torch.randn(n, IN, generator=gen, dtype=dtype)
    model = nn.Linear(IN, segments * K).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=gen, dtype=dtype))
        model.bias.copy_(torch.randn(model.bias.shape, generator=gen, dtype=dtype))
    return x1, x2, model


def _clone(model: nn.Module) -> nn.Module:
    copy = nn.Linear(model.in_features, model.out_features).to(model.weight.dtype)
    copy.load_state_dict(model.state_dict())
    return copy


def _step(model: nn.Module, x1, x2, loss_fn: MUSICLoss) -> dict:
    z1, z2 = model(x1), model(x2)
    z1.retain_grad()
    z2.retain_grad()
    terms = loss_fn(z1, z2, return_terms=True)
    terms.loss.backward()
    return {"terms": [t.detach().clone() for t in terms],
            "parts_require_grad": [t.requires_grad for t in terms[1:]],
            "z_grads": [z1.grad.clone(), z2.grad.clone()],
            "grads": [p.grad.detach().clone() for p in model.parameters()]}


def _worker(rank: int, world: int, init_file: str, out_dir: str, cases) -> None:
    if os.environ.get("TRITON_INTERPRET") is None:
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    results = {}
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    for segments, backend, dtype in cases:
        x1, x2, base = _data(world, segments, dtype)
        for shard in (True, False):
            model = DistributedDataParallel(_clone(base))
            loss_fn = MUSICLoss(K, gather_distributed=True, backend=backend, shard=shard,
                                precision="ieee")
            results[(segments, backend, shard)] = _step(model, x1[rows], x2[rows], loss_fn)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run(tmp_path, world: int, cases) -> list[dict]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    sys.path.insert(0, os.getcwd())
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), cases),
             nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _check(ranks: list[dict], world: int, cases) -> None:
    for segments, backend, dtype in cases:
        tol = DTYPE_TOL[dtype]
        x1, x2, base = _data(world, segments, dtype)
        # One process on the global batch, computed by the same backend.
        model = _clone(base)
        z1, z2 = model(x1), model(x2)
        z1.retain_grad()
        z2.retain_grad()
        single = MUSICLoss(K, backend=backend, precision="ieee")(z1, z2, return_terms=True)
        single.loss.backward()
        sharded = [r[(segments, backend, True)] for r in ranks]
        plain = [r[(segments, backend, False)] for r in ranks]
        worst_loss = worst_grad = worst_vs_plain = 0.0
        mean_loss = sum(r["terms"][0] for r in sharded) / world
        worst_loss = abs(float(mean_loss - single.loss.detach()))
        assert relative_error(mean_loss, single.loss) <= tol.loss, (segments, backend)
        for rank, (got, want) in enumerate(zip(sharded, plain)):
            where = (world, segments, backend, rank)
            assert got["parts_require_grad"] == [False, False, False], where
            # Every rank reports the global entropy parts and its own invariance.
            for part in range(4):
                err = relative_error(got["terms"][part], want["terms"][part])
                worst_vs_plain = max(worst_vs_plain, err)
                assert err <= tol.loss, (*where, part)
            for part in (1, 2):
                assert relative_error(got["terms"][part], single[part]) <= tol.loss, where
            # Gradient of this rank's own rows of both views.
            for got_z, want_z in zip(got["z_grads"], want["z_grads"]):
                err = relative_error(got_z, want_z)
                worst_vs_plain = max(worst_vs_plain, err)
                assert err <= tol.grad, where
            # DDP-averaged parameter gradients: single-process training.
            for got_p, want_p, single_p in zip(got["grads"], want["grads"],
                                               (p.grad for p in model.parameters())):
                worst_grad = max(worst_grad, relative_error(got_p, single_p))
                assert relative_error(got_p, single_p) <= tol.grad, where
                assert relative_error(got_p, want_p) <= tol.grad, where
        print(f"W={world} S={segments} {backend} {str(dtype)[6:]}: max|mean loss - single| "
              f"{worst_loss:.1e}, max param-grad rel err vs single {worst_grad:.1e}, "
              f"max rel err sharded vs unsharded (loss, parts, row grads) {worst_vs_plain:.1e}")


# ---------------------------------------------------------------------------------------
# One process: the ranks' row ranges of P add up to the whole, on every backend
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_row_ranges_add_up_to_the_whole(backend, world):
    """``sum_r`` of the partial entropy parts and of their gradients (row ranges of ``P`` from
    :func:`owned_segments`, several chunks per range) equals the unsharded loss's. Odd shapes:
    N = 33, K = 7, S = 5 (not divisible by 2, 3, 4; S < W never here, covered on gloo)."""
    from music_loss._config import LossConfig
    from music_loss._dispatch import run_backend
    from music_loss.distributed import owned_segments

    if backend == "triton":
        pytest.importorskip("triton")
        from music_loss.kernels import _common

        if not (torch.cuda.is_available() or _common.INTERPRET):
            pytest.skip("needs TRITON_INTERPRET=1 before music_loss.kernels is imported")
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    n, k, segments = 33, 7, 5
    gen = torch.Generator().manual_seed(world)
    z1 = torch.randn(n, k * segments, generator=gen, dtype=dtype).to(device).requires_grad_()
    z2 = torch.randn(n, k * segments, generator=gen, dtype=dtype).to(device).requires_grad_()
    config = LossConfig(segment_dim=k)
    inv_only = LossConfig(segment_dim=k, diag_weight=0.0, off_weight=0.0)

    def run(cfg, p_rows=None):
        if backend == "triton":
            from music_loss.kernels import music_loss_triton

            return music_loss_triton(z1, z2, cfg, None, "ieee", chunk_size=8, p_rows=p_rows)
        return run_backend(z1, z2, cfg, None, backend, "ieee", 8, p_rows=p_rows)

    full = run(config)
    want_grads = torch.autograd.grad(full.loss, (z1, z2))
    inv_grads = torch.autograd.grad(run(inv_only).loss, (z1, z2))
    parts = torch.zeros(2, dtype=torch.float64)
    grads = [-(world - 1) * g for g in inv_grads]  # each share carries the invariance once
    for rank in range(world):
        s0, s1 = owned_segments(segments, rank, world)
        share = run(config, (s0 * k, s1 * k))
        parts += torch.stack([share.diag, share.off]).detach().double().cpu()
        grads = [a + b for a, b in zip(grads, torch.autograd.grad(share.loss, (z1, z2)))]
    tol = DTYPE_TOL[dtype]
    assert relative_error(parts[0], full.diag) <= tol.loss
    assert relative_error(parts[1], full.off) <= tol.loss
    for got, want in zip(grads, want_grads):
        assert relative_error(got, want) <= tol.grad


def _cases(world: int, backends=("reference", "torch"), dtype=torch.float64):
    # S divisible by W, not divisible, S < W (some rank owns no segment).
    segment_counts = (2 * world, 2 * world - 1, world - 1)
    return [(s, b, dtype) for s in segment_counts for b in backends]


def test_sharded_two_ranks(tmp_path):
    cases = _cases(2)
    _check(_run(tmp_path, 2, cases), 2, cases)


def test_sharded_three_ranks(tmp_path):
    cases = _cases(3, backends=("torch",))
    _check(_run(tmp_path, 3, cases), 3, cases)


@pytest.mark.slow
def test_sharded_four_ranks(tmp_path):
    cases = _cases(4)
    _check(_run(tmp_path, 4, cases), 4, cases)


@pytest.mark.slow
def test_sharded_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    from music_loss.kernels import _common

    if not (torch.cuda.is_available() or _common.INTERPRET):
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
    cases = [(s, "triton", torch.float32) for s in (6, 5, 2)]
    _check(_run(tmp_path, 3, cases), 3, cases)


def _compile_worker(rank: int, world: int, init_file: str, out_dir: str, backend: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    x1, x2, base = _data(world, 5, torch.float64)
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    model = _clone(base)
    loss_fn = MUSICLoss(K, gather_distributed=True, backend=backend)

    def step(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(a), model(b))

    # An eager first call, then the same step compiled.
    eager = step(x1[rows], x2[rows])
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    from torch._inductor.compile_fx import compile_fx

    graphs: list[str] = []

    def record_then_inductor(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(str(gm.graph))
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=record_then_inductor)(x1[rows],
                                                                                x2[rows])
    compiled.backward()
    torch.save({"eager": eager.detach(), "compiled": compiled.detach(),
                "eager_grads": eager_grads, "graphs": graphs,
                "compiled_grads": [p.grad.clone() for p in model.parameters()]},
               os.path.join(out_dir, f"compile{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_step_compiles_fullgraph(tmp_path):
    """``torch.compile(fullgraph=True)`` traces the gather, the sharded loss and the
    all-reduce without a graph break and without a host read of a tensor (fullgraph alone
    lets ``float(t)`` through as a captured scalar), and computes what eager mode computes."""
    sys.path.insert(0, os.getcwd())
    mp.spawn(_compile_worker, args=(2, str(tmp_path / "init"), str(tmp_path), "torch"),
             nprocs=2, join=True)
    tol = DTYPE_TOL[torch.float64]
    for rank in range(2):
        got = torch.load(tmp_path / f"compile{rank}.pt")
        graph = "\n".join(got["graphs"])
        assert len(got["graphs"]) == 1
        assert "all_gather_into_tensor" in graph and "all_reduce" in graph, graph
        for host_read in ("target=item]", "_local_scalar_dense", "target=tolist]"):
            assert host_read not in graph, (host_read, graph)
        assert relative_error(got["compiled"], got["eager"]) <= tol.loss
        for a, b in zip(got["compiled_grads"], got["eager_grads"]):
            assert relative_error(a, b) <= tol.grad
