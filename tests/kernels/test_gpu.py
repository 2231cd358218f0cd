"""GPU checks of the fused kernels (marker ``gpu``; skipped without CUDA).

Run on a GPU machine with one command::

    python -m pytest tests/kernels -m gpu -s

- the paper's shape (N=2048, D=8160, K=80) against the float64 reference, per precision,
  forward and backward, with the extra peak memory of both;
- ``N * D >= 2**31`` (int64 offsets) against the ``torch`` backend, the last rows checked
  on their own (a 32-bit offset wraps exactly there);
- ``torch.compile(fullgraph=True)`` of a training step on the Triton path.
The interpreter tests in ``test_interpreter.py`` also run on the GPU then (compiled kernels,
real tf32/bf16 tensor cores, against ``tests.tolerances.PRECISION_TOL``).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from music_loss import MUSICLoss, music_loss
from tests.tolerances import PRECISION_TOL, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _views(n, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    z1 = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.float32) * 2
    z2 = z1 + torch.randn(n, d, device="cuda", generator=gen, dtype=torch.float32)
    return z1.to(dtype), z2.to(dtype)


def _run(z1, z2, k, backend, precision, dtype=None):
    z1 = z1.detach().clone().requires_grad_(True)
    z2 = z2.detach().clone().requires_grad_(True)
    terms = music_loss(z1, z2, k, backend=backend, precision=precision, return_terms=True)
    terms.loss.backward()
    return terms, z1.grad, z2.grad


def _peak_extra(fn):
    """Peak CUDA memory allocated during ``fn`` beyond what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_paper_shape_against_float64_reference(precision):
    n, d, k = 2048, 8160, 80
    z1, z2 = _views(n, d, torch.float32)
    (terms, g1, g2), fused_peak = _peak_extra(lambda: _run(z1, z2, k, "triton", precision))
    (want, w1, w2), ref_peak = _peak_extra(
        lambda: _run(z1.double(), z2.double(), k, "reference", "ieee"))
    tol = PRECISION_TOL[precision]
    loss_err = relative_error(terms.loss, want.loss)
    grad_err = max(relative_error(g1, w1), relative_error(g2, w2))
    print(f"\n{torch.cuda.get_device_name()} N={n} D={d} K={k} {precision}: loss rel "
          f"{loss_err:.2e}, grad rel {grad_err:.2e}; extra peak fused {fused_peak / 2**20:.0f} "
          f"MiB vs float64 reference {ref_peak / 2**20:.0f} MiB")
    assert loss_err <= tol.loss and grad_err <= tol.grad
    # Gradients of the inputs (2 N D * 4 B) are the caller's: the rest is O(N D) + workspace.
    assert fused_peak <= 16 * n * d * 4 + 64 * 2**20


def test_int64_offsets_against_torch_backend():
    k, d = 80, 240
    n = 2**31 // d + 1 + 333  # N * D >= 2**31
    assert n * d >= 2**31
    free, _total = torch.cuda.mem_get_info()
    if free < 60 * 2**30:
        pytest.skip(f"needs ~60 GiB free GPU memory, have {free / 2**30:.0f}")
    z1, z2 = _views(n, d, torch.bfloat16, seed=1)
    terms, g1, g2 = _run(z1, z2, k, "triton", "bf16")
    tail = slice(n - 4096, n)  # rows whose offsets pass 2**31
    got = (terms.loss.detach(), g1[tail].float().clone(), g2[tail].float().clone(),
           g1[:4096].float().clone())
    del terms, g1, g2
    gc.collect()
    torch.cuda.empty_cache()
    want_terms, w1, w2 = _run(z1, z2, k, "torch", "bf16")
    tol = PRECISION_TOL["bf16"]
    assert relative_error(got[0], want_terms.loss) <= tol.loss
    assert relative_error(got[1], w1[tail].float()) <= tol.grad
    assert relative_error(got[2], w2[tail].float()) <= tol.grad
    assert relative_error(got[3], w1[:4096].float()) <= tol.grad


class _TinySSL(nn.Module):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.projector = nn.Linear(64, 960)
        self.loss = MUSICLoss(segment_dim=80, backend=backend, precision="ieee")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.loss(self.projector(x1), self.projector(x2))


def test_compiled_training_step_fullgraph():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _TinySSL("triton").cuda()
    x1, x2 = torch.randn(256, 64, device="cuda"), torch.randn(256, 64, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(x1, x2)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model64 = _TinySSL("reference").cuda().double()
    model64.load_state_dict(model.state_dict())
    want = model64(x1.double(), x2.double())
    want.backward()
    tol = PRECISION_TOL["ieee"]
    assert relative_error(loss, want) <= tol.loss
    for got, p64 in zip(grads, model64.parameters()):
        assert relative_error(got, p64.grad) <= tol.grad


# ---------------------------------------------------------------------------------------
# The epilogue's fast log (tf32/bf16 modes): measured on the device, against float64 and
# against the accurate log, elementwise and in the loss (the tf32 and bf16 budgets).
# ---------------------------------------------------------------------------------------
def test_fast_log_error_on_the_device():
    """``lg2.approx.f32 * ln 2`` (``_common.lg_fast``) against float64 over every binade of
    the normal range up to 1 (where ``P`` lives): within :data:`FAST_LOG_BOUND`, the bound
    the CPU tests assume (``test_fast_log_worst_case_fits_the_budgets``)."""
    import triton
    import triton.language as tl

    from music_loss.kernels._common import lg, lg_fast
    from tests.tolerances import FAST_LOG_BOUND

    @triton.jit
    def logs_kernel(x_ptr, fast_ptr, accurate_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
        tl.store(fast_ptr + offs, lg_fast(x, False), mask=offs < n)
        tl.store(accurate_ptr + offs, lg(x), mask=offs < n)

    gen = torch.Generator(device="cuda").manual_seed(0)
    exponents = torch.randint(-126, 1, (1 << 24,), device="cuda", generator=gen)
    mantissas = 1 + torch.rand(1 << 24, device="cuda", generator=gen)
    x = torch.ldexp(mantissas, exponents.float()).clamp_max(1.0)  # [2^-126, 1]
    fast, accurate = torch.empty_like(x), torch.empty_like(x)
    logs_kernel[(triton.cdiv(x.numel(), 1024),)](x, fast, accurate, x.numel(), BLOCK=1024)
    exact = torch.log(x.double())
    err = (fast.double() - exact).abs()
    allowed = FAST_LOG_BOUND.absolute + FAST_LOG_BOUND.relative * exact.abs()
    accurate_err = (accurate.double() - exact).abs()
    print(f"\n{torch.cuda.get_device_name()} lg2.approx*ln2 on [2^-126, 1]: max abs error "
          f"{err.max().item():.2e}, max error / |log x| {(err / exact.abs().clamp_min(1e-30)).max().item():.2e}, "
          f"worst share of the assumed bound {(err / allowed).max().item():.2f}; "
          f"accurate logf: max abs {accurate_err.max().item():.2e}")
    assert bool((err <= allowed).all())


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fast_log_costs_nothing_against_the_budgets(precision):
    """At the paper's shape: the entropy sums and off-block gradients with the fast log
    against the same kernels with the accurate log (libdevice's logf)."""
    from music_loss.kernels._common import operand_dtype
    from music_loss.kernels.launchers import JointPlan, joint_entropy_pass, softmax_forward

    n, d, k = 2048, 8160, 80
    z1, z2 = _views(n, d, torch.float32, seed=3)
    p1, p2, _ = softmax_forward(z1, z2, k, 1.0, 1e-8, operand_dtype(precision),
                                round_tf32=precision == "tf32")
    plan = JointPlan(k, 1.0, precision, grads=(True, True))
    fast = joint_entropy_pass(p1, p2, plan._replace(fast_log=True))
    accurate = joint_entropy_pass(p1, p2, plan._replace(fast_log=False))
    sums = {name: (torch.stack([r.h_diag, r.h_off]).double()) for name, r in
            (("fast", fast), ("accurate", accurate))}
    loss_diff = relative_error(sums["fast"], sums["accurate"])
    grad_diff = max(relative_error(fast.dp1, accurate.dp1), relative_error(fast.dp2,
                                                                          accurate.dp2))
    print(f"\n{torch.cuda.get_device_name()} {precision} N={n} D={d}: fast vs accurate log: "
          f"entropy sums rel {loss_diff:.2e}, off-block gradients rel {grad_diff:.2e} "
          f"(budget: loss {PRECISION_TOL[precision].loss:.0e})")
    assert loss_diff <= 1e-2 * PRECISION_TOL[precision].loss
    assert grad_diff <= 1e-2 * PRECISION_TOL[precision].grad
