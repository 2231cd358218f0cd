"""The Triton kernels against float64 references, forward and backward.

On CPU these run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
when there is no CUDA device); on a GPU machine the same tests run the compiled kernels.
Shapes are small and odd: K = 80, 7, 2, 63 and 65, S = 1, N and D multiples of no block
size, and several chunks of rows of ``P``. Per precision:

- ``ieee``: against float64 autograd of ``music_loss.reference`` (the float32 target);
- ``tf32``: the interpreter computes ``input_precision="tf32"`` as exact fp32, so the kernels
  emulate tensor cores there (operands truncated to tf32 as they are read, after the
  launcher rounded them to nearest tf32 where they are stored); compared with a float64
  oracle rounding the same operands, and against unrounded float64 at the tf32 tolerance.
  ``test_tf32_rounding_removes_the_truncation_bias`` measures the bias rounding removes;
- ``bf16``: the interpreter's bf16 ``tl.dot`` is broken, so the launcher rounds operands to
  bf16 and takes an fp32 dot; compared with a float64 oracle rounding the same operands
  (``_oracle.rounded_oracle``), and reported (loosely bounded) against unrounded float64.

The worst error per precision over the matrix is printed at the end (``pytest -s``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from music_loss import music_loss
from music_loss._config import LossConfig
from music_loss.reference import (
    joint_entropy_terms_reference,
    music_loss_reference,
    segment_softmax_reference,
)
from tests.kernels._oracle import rounded_oracle
from tests.tolerances import (
    BF16_EMULATED_VS_ROUNDED_ORACLE,
    DTYPE_TOL,
    PRECISION_TOL,
    TF32_EMULATED_VS_ROUNDED_ORACLE,
    WorstErrors,
    relative_error,
)

kernels = pytest.importorskip("music_loss.kernels")
from music_loss.kernels import _common  # noqa: E402
from music_loss.kernels.launchers import JointPlan, joint_entropy_pass  # noqa: E402
from music_loss.kernels.triton_backend import music_loss_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not _common.INTERPRET,
    reason="needs CUDA, or TRITON_INTERPRET=1 set before music_loss.kernels is imported")

# (N, D, K, chunk_size): K = 80 (paper), 7, 2 (most pairs of bins are off-block), S = 1,
# and segment boundaries one column inside (K = 63) and outside (K = 65) the 64-wide tile
# edges of the interpreter's joint tiles: the epilogue's block classification at its edges.
SHAPES = [(45, 240, 80, 64), (33, 105, 7, 64), (20, 24, 2, 16), (19, 60, 60, 0),
          (21, 189, 63, 64), (17, 195, 65, 0)]
PRECISIONS = ["ieee", "tf32", "bf16"]
WORST = WorstErrors("kernel tests: worst relative errors (Frobenius) over the matrix")


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors():
    yield
    WORST.report()


def _views(n: int, d: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 31 * n + d)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2
    z2 = z1 + torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z1.to(dtype).to(DEVICE), z2.to(dtype).to(DEVICE)


def _triton_terms_and_grads(z1, z2, config, precision, local_rows=None, grad_terms=None,
                            chunk_size=None):
    z1 = z1.detach().clone().requires_grad_(True)
    z2 = z2.detach().clone().requires_grad_(True)
    terms = music_loss_triton(z1, z2, config, local_rows, precision,
                              chunk_size=chunk_size or None)
    # Only the loss carries a gradient: the parts are logging values.
    assert terms.loss.requires_grad and not any(t.requires_grad for t in terms[1:])
    weights = grad_terms if grad_terms is not None else torch.tensor([1.0, 0, 0, 0])
    objective = sum(w * t for w, t in zip(weights.tolist(), terms))
    g1, g2 = torch.autograd.grad(objective, (z1, z2))
    return terms, g1, g2


def _float64_truth(z1, z2, config, local_rows=None, grad_terms=None):
    z1 = z1.detach().cpu().double().requires_grad_(True)
    z2 = z2.detach().cpu().double().requires_grad_(True)
    terms = music_loss_reference(z1, z2, config, local_rows)
    weights = grad_terms if grad_terms is not None else torch.tensor([1.0, 0, 0, 0])
    objective = sum(w * t for w, t in zip(weights.tolist(), terms))
    g1, g2 = torch.autograd.grad(objective, (z1, z2))
    return terms, g1, g2


def _compare(key, got, want, tol):
    terms, g1, g2 = got
    terms_w, g1_w, g2_w = want
    for name, a, b in zip(("loss", "diag", "off", "invariance"), terms, terms_w):
        err = WORST.record(f"{key} {name}", relative_error(a.cpu(), b))
        assert err <= tol.loss, f"{name}: {err:.2e} > {tol.loss:.0e}"
    grad_err = max(relative_error(g1.cpu(), g1_w), relative_error(g2.cpu(), g2_w))
    WORST.record(f"{key} grad", grad_err)
    assert grad_err <= tol.grad, f"gradient: {grad_err:.2e} > {tol.grad:.0e}"


# ---------------------------------------------------------------------------------------
# The matrix: every shape x precision, forward and backward.
# ---------------------------------------------------------------------------------------
MATRIX = list(itertools.product(SHAPES, PRECISIONS))


@pytest.mark.parametrize("shape,precision", MATRIX,
                         ids=[f"N{s[0]}xD{s[1]}xK{s[2]}-{p}" for s, p in MATRIX])
def test_fused_loss_matches_reference(shape, precision):
    n, d, k, chunk = shape
    config = LossConfig(segment_dim=k)
    z1, z2 = _views(n, d)
    got = _triton_terms_and_grads(z1, z2, config, precision, chunk_size=chunk)
    if precision == "bf16" and DEVICE == "cuda":
        _compare("bf16 (tensor cores) vs float64", got, _float64_truth(z1, z2, config),
                 PRECISION_TOL["bf16"])
    elif precision == "bf16":
        terms, g1, g2 = rounded_oracle(z1.cpu(), z2.cpu(), config)
        _compare("bf16 (emulated) vs rounded oracle", got, (terms, g1, g2),
                 BF16_EMULATED_VS_ROUNDED_ORACLE)
        # Against unrounded float64: the cost of bf16 operands, reported and loosely bounded.
        _compare("bf16 (emulated) vs float64", got, _float64_truth(z1, z2, config),
                 PRECISION_TOL["bf16"])
    elif precision == "tf32" and DEVICE == "cuda":
        _compare("tf32 (tensor cores) vs float64", got, _float64_truth(z1, z2, config),
                 PRECISION_TOL["tf32"])
    elif precision == "tf32":
        want = rounded_oracle(z1.cpu(), z2.cpu(), config, tf32="round")
        _compare("tf32 (emulated) vs rounded oracle", got, want, TF32_EMULATED_VS_ROUNDED_ORACLE)
        _compare("tf32 (emulated) vs float64", got, _float64_truth(z1, z2, config),
                 PRECISION_TOL["tf32"])
    else:
        _compare(f"{precision} vs float64", got, _float64_truth(z1, z2, config),
                 PRECISION_TOL["ieee"])


def test_rounded_oracle_without_rounding_is_the_reference():
    """The oracle's hand-written gradient equals float64 autograd of the reference."""
    config = LossConfig(segment_dim=7, normalization="joint", eps=1e-3, temperature=0.7,
                        diag_weight=0.5, off_weight=2.0, invariance_weight=0.3)
    z1, z2 = _views(11, 35, torch.float64)
    grad_terms = torch.tensor([0.7, -1.3, 0.4, 2.1])
    terms, g1, g2 = rounded_oracle(z1.cpu(), z2.cpu(), config, (2, 9), round_bf16=False,
                                   grad_terms=grad_terms)
    terms_w, g1_w, g2_w = _float64_truth(z1, z2, config, (2, 9), grad_terms)
    for a, b in zip(terms, terms_w):
        assert relative_error(a, b) <= 1e-6  # the oracle takes p from float32
    assert relative_error(g1, g1_w) <= 1e-6 and relative_error(g2, g2_w) <= 1e-6


# ---------------------------------------------------------------------------------------
# Options, dtypes, layouts, per-term gradients (ieee; bf16 where rounding matters).
# ---------------------------------------------------------------------------------------
OPTION_CASES = [  # (normalization, eps, temperature, weights)
    ("joint", 1e-8, 1.0, (1.0, 1.0, 1.0)),
    ("blocks", 0.0, 0.5, (1.0, 1.0, 1.0)),
    ("joint", 1e-3, 2.0, (0.5, 2.0, 0.3)),
    ("blocks", 1e-8, 1.0, (1.0, 0.0, 1.0)),
]


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: f"{o[0]}-eps{o[1]:g}-t{o[2]:g}"
                         f"-w{'/'.join(map(str, o[3]))}")
def test_options_local_rows_and_upstream_gradient(options):
    normalization, eps, temperature, (wd, wo, wi) = options
    config = LossConfig(segment_dim=20, temperature=temperature, eps=eps, diag_weight=wd,
                        off_weight=wo, invariance_weight=wi, normalization=normalization)
    z1, z2 = _views(23, 60)
    # Not the last layer: the loss's upstream gradient is not 1 (the parts are detached).
    grad_terms = torch.tensor([-1.7, 0.0, 0.0, 0.0])
    got = _triton_terms_and_grads(z1, z2, config, "ieee", (4, 17), grad_terms, chunk_size=32)
    _compare("ieee options vs float64", got,
             _float64_truth(z1, z2, config, (4, 17), grad_terms), PRECISION_TOL["ieee"])


def test_bf16_upstream_gradient_matches_the_rounded_oracle():
    config = LossConfig(segment_dim=20, normalization="joint", invariance_weight=0.5)
    z1, z2 = _views(23, 60, seed=3)
    grad_terms = torch.tensor([2.5, 0.0, 0.0, 0.0])
    got = _triton_terms_and_grads(z1, z2, config, "bf16", (0, 23), grad_terms, chunk_size=32)
    want = rounded_oracle(z1.cpu(), z2.cpu(), config, (0, 23), round_bf16=DEVICE == "cpu",
                          grad_terms=grad_terms)
    tol = BF16_EMULATED_VS_ROUNDED_ORACLE if DEVICE == "cpu" else PRECISION_TOL["bf16"]
    _compare("bf16 per-term vs rounded oracle", got, want, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_inputs(dtype):
    config = LossConfig(segment_dim=20)
    z1, z2 = _views(21, 60, dtype)
    got = _triton_terms_and_grads(z1, z2, config, "ieee")
    assert got[1].dtype == dtype and got[2].dtype == dtype
    _compare(f"ieee {dtype} inputs vs float64", got, _float64_truth(z1, z2, config),
             DTYPE_TOL[dtype])


def test_non_contiguous_inputs_and_grad_scale():
    config = LossConfig(segment_dim=20)
    base1, base2 = _views(60, 25)
    z1, z2 = base1.T, base2.T[:, :]  # (25, 60), column-major
    assert not z1.is_contiguous()
    got = _triton_terms_and_grads(z1, z2, config, "ieee", grad_terms=torch.tensor([3.7, 0, 0, 0]))
    want = _float64_truth(z1, z2, config, grad_terms=torch.tensor([3.7, 0, 0, 0]))
    _compare("ieee non-contiguous, grad x3.7 vs float64", got, want, PRECISION_TOL["ieee"])


def test_retained_graph_gives_the_same_gradient_twice():
    """The gradients are finished in the forward and the backward scales them: a second
    backward through a retained graph (another upstream gradient) must not see the first's
    scaling."""
    config = LossConfig(segment_dim=20)
    z1, z2 = (z.requires_grad_(True) for z in _views(19, 60))
    loss = music_loss_triton(z1, z2, config, None, "ieee").loss
    first = torch.autograd.grad(loss, (z1, z2), torch.tensor(3.0), retain_graph=True)
    second = torch.autograd.grad(loss, (z1, z2), torch.tensor(-0.5))
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a * (-0.5 / 3.0), rtol=1e-6, atol=0)


def test_no_grad_and_grad_paths_agree():
    config = LossConfig(segment_dim=20)
    z1, z2 = _views(17, 60)
    with torch.no_grad():
        plain = music_loss_triton(z1, z2, config, None, "ieee")
    with_grad = _triton_terms_and_grads(z1, z2, config, "ieee")[0]
    for a, b in zip(plain, with_grad):
        assert torch.equal(a, b.detach())
    assert not plain.loss.requires_grad


def test_deterministic_under_torch_deterministic_algorithms():
    config = LossConfig(segment_dim=20)
    z1, z2 = _views(29, 60)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_triton_terms_and_grads(z1, z2, config, "tf32", chunk_size=32) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    (t_a, g1_a, g2_a), (t_b, g1_b, g2_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(t_a, t_b))
    assert torch.equal(g1_a, g1_b) and torch.equal(g2_a, g2_b)


def test_dispatch_routes_backend_triton():
    z1, z2 = _views(16, 40)
    got = music_loss(z1, z2, 20, backend="triton", precision="ieee")
    want = music_loss(z1.double(), z2.double(), 20, backend="reference")
    assert relative_error(got.cpu(), want.cpu()) <= PRECISION_TOL["ieee"].loss


def test_known_optimum():
    """One-hot, evenly spread, pairwise independent assignments: loss = -3 log K."""
    k, s = 5, 3
    x, y = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    x, y = x.flatten(), y.flatten()  # N = K^2 rows; segment j uses x + j y mod K (OA(2))
    bins = torch.stack([(x + j * y) % k for j in range(s)], dim=1)
    z = torch.nn.functional.one_hot(bins, k).float().reshape(k * k, s * k) * 40.0
    terms = music_loss_triton(z.to(DEVICE), z.to(DEVICE), LossConfig(segment_dim=k), None,
                              "ieee")
    expected = -3 * torch.log(torch.tensor(float(k), dtype=torch.float64))
    assert abs(float(terms.loss) - float(expected)) <= 1e-6 * abs(float(expected))


def test_bad_arguments_are_refused():
    z1, z2 = _views(8, 20)
    with pytest.raises(ValueError, match="precision"):
        music_loss_triton(z1, z2, LossConfig(segment_dim=10), None, "fp8")
    with pytest.raises(TypeError, match="float64"):
        music_loss_triton(z1.double(), z2.double(), LossConfig(segment_dim=10), None, "ieee")
    with pytest.raises(ValueError, match="chunk_size"):
        music_loss_triton(z1, z2, LossConfig(segment_dim=10), None, "ieee", chunk_size=0)
    # The products scale by c_off / N (and dp2 starts from C / that scale): a plan asking for
    # them with c_off = 0 is refused, not run into a division by zero.
    p = torch.softmax(z1.view(8, 2, 10), -1).reshape(8, 20).contiguous()
    with pytest.raises(ValueError, match="c_off must be nonzero"):
        joint_entropy_pass(p, p.clone(), JointPlan(10, 0.0, "bf16", grads=(False, True)))
    sums_only = joint_entropy_pass(p, p.clone(), JointPlan(10, 0.0, "bf16"))
    assert sums_only.dp2.numel() == 0


# ---------------------------------------------------------------------------------------
# Each kernel on its own.
# ---------------------------------------------------------------------------------------
SOFTMAX_CASES = [(9, 240, 80, 1.0, 1e-8), (13, 21, 7, 0.5, 0.0), (6, 5, 1, 1.0, 0.0),
                 (7, 24, 3, 2.0, 0.2)]


@pytest.mark.parametrize("n,d,k,temperature,eps", SOFTMAX_CASES)
def test_segment_softmax_kernel_forward(n, d, k, temperature, eps):
    """One view through the forward kernel, column-major input; its backward is the loss's
    (``music_loss_bwd_kernel``), held to float64 by the gradient tests above."""
    from music_loss.kernels.launchers import softmax_forward

    z, _ = _views(n, d)
    z = z[:, :].T.contiguous().T  # column-major input
    p, p2, inv = softmax_forward(z, None, k, temperature, eps)
    assert p2 is None and inv is None
    p64 = segment_softmax_reference(z.cpu().double(), k, temperature, eps)
    tol = PRECISION_TOL["ieee"]
    assert WORST.record("softmax kernel p", relative_error(p.cpu(), p64)) <= tol.loss


# Pinned tiles: narrow ones (several tiles and chunks per pass) and the widest autotune tile
# (128x128, 64 accumulators per thread: one tile holds all of D, every edge masked).
JOINT_METAS = [None, {"BLOCK_A": 32, "BLOCK_B": 16, "BLOCK_N": 16, "GROUP_A": 2},
               {"BLOCK_A": 16, "BLOCK_B": 64, "BLOCK_N": 64, "GROUP_A": 8},
               {"BLOCK_A": 128, "BLOCK_B": 128, "BLOCK_N": 32, "GROUP_A": 8}]


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("meta", JOINT_METAS,
                         ids=["default", "32x16x16", "16x64x64", "128x128x32"])
def test_joint_entropy_kernel_forward_backward(meta, precision):
    """The joint pass against float64 autograd, in ieee and in tf32 (whose operand tiles of
    every width, 16 to 128 columns, are assembled from 16-column loads where Hopper needs
    them K-major; the interpreter runs that path: a misplaced column is an O(1) error)."""
    n, d, k = 27, 70, 7
    z1, z2 = _views(n, d)
    p1 = segment_softmax_reference(z1, k, 1.0, 1e-8)
    p2 = segment_softmax_reference(z2, k, 1.0, 1e-8)
    p1_64 = p1.cpu().double().requires_grad_(True)
    p2_64 = p2.cpu().double().requires_grad_(True)
    h64 = joint_entropy_terms_reference(p1_64, p2_64, k)
    upstream = torch.tensor([0.7, -1.9], dtype=torch.float64)
    g64 = torch.autograd.grad(h64, (p1_64, p2_64), tuple(upstream))
    tol = PRECISION_TOL[precision]
    # Default: one chunk, the launcher's tiles; pinned tile shapes: several chunks.
    plan = JointPlan(k, 1.0, precision, grads=(True, True))
    if meta is not None:
        plan = plan._replace(chunk_size=32, joint_meta=meta,
                             matmul_meta={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16,
                                          "GROUP_M": 2})
    result = joint_entropy_pass(p1.contiguous(), p2.contiguous(), plan)
    h = (result.h_diag, result.h_off)
    joint64 = p1_64.detach().T @ p2_64.detach() / n
    assert relative_error(result.p_diag.cpu(), torch.diagonal(joint64)) <= tol.loss
    # The off-block part of the gradient, scaled by the upstream gradient of H_off.
    per_col = (torch.log(torch.diagonal(joint64)) + 1) / n
    off1 = (g64[0] - upstream[0] * per_col * p2_64.detach()) / upstream[1]
    off2 = (g64[1] - upstream[0] * per_col * p1_64.detach()) / upstream[1]
    key = f"joint kernel ({precision})"
    assert WORST.record(f"{key} dp", relative_error(result.dp1.cpu(), off1)) <= tol.grad
    assert WORST.record(f"{key} dp", relative_error(result.dp2.cpu(), off2)) <= tol.grad
    for a, b in zip(h, h64):
        assert WORST.record(f"{key} H", relative_error(a.cpu(), b)) <= tol.loss


# ---------------------------------------------------------------------------------------
# Random small shapes (masking at every edge), ieee against float64.
# ---------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 40), s=st.integers(1, 6), k=st.integers(1, 300),
       chunk=st.sampled_from([16, 48, 0]), seed=st.integers(0, 2**16))
def test_random_shapes_match_float64(n, s, k, chunk, seed):
    if s * k > 320:  # keep each example under ~2 s in the interpreter
        k = max(1, 320 // s)
    config = LossConfig(segment_dim=k)
    z1, z2 = _views(n, s * k, seed=seed)
    got = _triton_terms_and_grads(z1, z2, config, "ieee", chunk_size=chunk)
    _compare("ieee random shapes vs float64", got, _float64_truth(z1, z2, config),
             PRECISION_TOL["ieee"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inf-inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan_not_a_finite_number(bad):
    z1, z2 = _views(9, 40)
    z1[3, 5] = bad
    terms = music_loss_triton(z1, z2, LossConfig(segment_dim=20), None, "ieee")
    assert torch.isnan(terms.loss)


# ---------------------------------------------------------------------------------------
# tf32: rounding where operands are stored removes the truncation bias.
# ---------------------------------------------------------------------------------------
def test_softmax_kernel_rounds_p_to_nearest_tf32():
    """The stored operand is exactly the nearest tf32 of the fp32 softmax (emulation on CPU,
    ``cvt.rna.tf32.f32`` on a GPU)."""
    from music_loss.kernels.launchers import softmax_forward
    from tests.kernels._oracle import tf32_round

    z1, z2 = _views(13, 240)
    plain1, plain2, plain_inv = softmax_forward(z1, z2, 80, 1.0, 1e-8)
    rounded1, rounded2, inv = softmax_forward(z1, z2, 80, 1.0, 1e-8, round_tf32=True)
    assert torch.equal(rounded1, tf32_round(plain1)) and torch.equal(rounded2, tf32_round(plain2))
    assert not torch.equal(rounded1, plain1)  # the rounding did something
    # The invariance term takes the unrounded values.
    assert torch.equal(inv, plain_inv)


def _tf32_loss(z1, z2, config, round_tf32):
    """The loss from the kernels in tf32 mode, operands rounded where stored or not."""
    from music_loss.kernels.launchers import softmax_forward

    n, d = z1.shape
    p1, p2, inv_partials = softmax_forward(z1, z2, config.segment_dim, config.temperature,
                                           config.eps, round_tf32=round_tf32)
    joint = joint_entropy_pass(p1, p2, JointPlan(config.segment_dim, 1.0, "tf32",
                                                 round_tf32=round_tf32))
    c_diag, c_off = config.coefficients(d)
    inv = -config.invariance_weight * inv_partials.sum(dtype=torch.float64) / (
        n * (d // config.segment_dim))
    return c_diag * joint.h_diag + c_off * joint.h_off + inv


def test_tf32_rounding_removes_the_truncation_bias():
    """Tensor cores truncate fp32 operands; every p is positive, so unrounded operands bias
    P, and the loss, downward. With the operands rounded to nearest on store the loss meets
    the tf32 target (1e-4 relative); without, it does not (CPU: the interpreter's tf32
    emulation; GPU: real tensor cores)."""
    config = LossConfig(segment_dim=80)
    z1, z2 = _views(64, 480, seed=5)
    truth = float(_float64_truth(z1, z2, config)[0].loss.detach())
    truncated = abs(float(_tf32_loss(z1, z2, config, False)) - truth) / abs(truth)
    rounded = abs(float(_tf32_loss(z1, z2, config, True)) - truth) / abs(truth)
    WORST.record("tf32 loss error, operands truncated", truncated)
    WORST.record("tf32 loss error, operands rounded on store", rounded)
    assert truncated > 2e-4, f"no truncation bias seen ({truncated:.2e}): is tf32 emulated?"
    assert rounded <= 1e-4 and rounded <= truncated / 10, (rounded, truncated)


# ---------------------------------------------------------------------------------------
# The fast log of the tf32/bf16 epilogue: what its assumed worst case costs.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.1], ids=["t1", "t0.1-peaked"])
def test_fast_log_worst_case_fits_the_budgets(temperature):
    """Every log of ``P`` off by the assumed worst case (``FAST_LOG_BOUND``, all in the same
    direction) moves the entropy terms and ``G`` by at most this, in float64: far inside the
    tf32 (1e-4) and bf16 (2e-3) loss targets, and below the ieee one (1e-6), which
    keeps the accurate log anyway. The device's own error is measured by
    ``tests/kernels/test_gpu.py::test_fast_log_error_on_the_device``."""
    from tests.tolerances import FAST_LOG_BOUND

    n, d, k = 256, 960, 80
    z1, z2 = _views(n, d, torch.float64, seed=7)
    p1, p2 = (segment_softmax_reference(z, k, temperature, 1e-8) for z in (z1, z2))
    joint = p1.T @ p2 / n
    segment = torch.arange(d) // k
    diag = torch.eye(d, dtype=torch.bool)
    off = segment[:, None] != segment[None, :]
    log_joint = joint.clamp_min(torch.finfo(torch.float32).tiny).log()
    bound = FAST_LOG_BOUND.absolute + FAST_LOG_BOUND.relative * log_joint.abs()
    c_diag, c_off = LossConfig(segment_dim=k).coefficients(d)
    entropy = abs(c_diag) * (joint * log_joint)[diag].abs().sum() + abs(c_off) * (
        joint * log_joint)[off].abs().sum()
    shift = abs(c_diag) * (joint * bound)[diag].sum() + abs(c_off) * (joint * bound)[off].sum()
    loss_rel = float(shift / entropy)
    grad = torch.where(off, log_joint + 1, 0.0)
    grad_rel = float(torch.where(off, bound, 0.0).norm() / grad.norm())
    WORST.record("fast log worst case: entropy terms", loss_rel)
    WORST.record("fast log worst case: G (Frobenius)", grad_rel)
    assert loss_rel <= 1e-6 and grad_rel <= 1e-6, (loss_rel, grad_rel)


# ---------------------------------------------------------------------------------------
# The TMA gradient products (opt-in, MUSIC_LOSS_TMA=1; Hopper, or the interpreter).
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("n,d,k,chunk", [(44, 240, 80, 64), (32, 96, 8, 32), (21, 105, 7, 64)],
                         ids=["K80-3-chunks", "K8-3-chunks", "D105-N21-unaligned-fall-back"])
def test_tma_kernels_match_the_pointer_kernels(monkeypatch, precision, n, d, k, chunk):
    """With descriptors the joint kernel and the products give what the pointer kernels give
    (bit for bit under the interpreter: same tiles, same order), edge tiles included (TMA
    zero-fills reads and clips stores past the shape); rows that are no multiple of 16 bytes
    (D=105) keep the pointer kernels, and so do tf32's joint kernel and ``dp2`` product,
    which form their K-major operands on chip from pointer loads."""
    from music_loss.kernels import joint_entropy as je
    from music_loss.kernels import launchers

    products: list[bool] = []
    joint: list[bool] = []
    real_tma, real_launch = launchers._matmul_tma, launchers.launch

    def product_spy(*args, **kwargs):
        products.append(real_tma(*args, **kwargs))
        return products[-1]

    def launch_spy(tuner, raw, *args, **kwargs):
        if raw is je.joint_entropy_kernel:
            joint.append(kwargs["USE_TMA"])
        return real_launch(tuner, raw, *args, **kwargs)

    monkeypatch.setattr(launchers, "_matmul_tma", product_spy)
    monkeypatch.setattr(launchers, "launch", launch_spy)
    monkeypatch.setenv("MUSIC_LOSS_TMA", "1")
    if not launchers.use_tma(torch.device(DEVICE), precision):
        pytest.skip("TMA needs sm_90+ (or the interpreter) and triton >= 3.4")
    z1, z2 = _views(n, d, seed=11)
    config = LossConfig(segment_dim=k)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MUSIC_LOSS_TMA", flag)
        joint.clear()
        terms, g1, g2 = _triton_terms_and_grads(z1, z2, config, precision, chunk_size=chunk)
        results[flag] = [*terms, g1, g2]
    chunks = -(-d // chunk)
    rows_aligned = d % 4 == 0  # fp32 (N, D) rows; bf16 on a GPU: d % 8, here all fp32
    tf32 = precision == "tf32"
    assert products == [rows_aligned] * ((1 if tf32 else 2) * chunks), products  # tf32: dp1
    assert joint == [rows_aligned and not tf32] * chunks, joint
    for got, want in zip(results["1"], results["0"]):
        if _common.INTERPRET:
            assert torch.equal(got, want)
        else:  # tensor cores: the TMA path may pick other tiles
            assert relative_error(got, want) <= PRECISION_TOL[precision].grad


# ---------------------------------------------------------------------------------------
# The warp-specialised joint kernel (opt-in, MUSIC_LOSS_WARP_SPECIALIZE=1; sm_90 bf16, or
# the interpreter).
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d,k,chunk", [(45, 240, 80, 64), (33, 160, 8, 0), (21, 105, 7, 64)],
                         ids=["K80-4-chunks", "K8-one-chunk", "D105-unaligned-fall-back"])
def test_warp_specialized_joint_kernel_matches_the_rounded_oracle(monkeypatch, n, d, k, chunk):
    """bf16 with the warp-specialised joint kernel (128-row tiles, per-row partial sums):
    the terms and gradients of the float64 oracle rounding the same operands, within the
    tolerance the default kernel meets; rows that break TMA's layout rules (D=105: rows of
    no multiple of 16 bytes) keep the default kernel."""
    from music_loss.kernels import joint_entropy as je
    from music_loss.kernels import launchers

    flags: list[bool] = []
    real_launch = launchers.launch

    def launch_spy(tuner, raw, *args, **kwargs):
        if raw is je.joint_entropy_kernel:
            flags.append(kwargs.get("WARP_SPECIALIZE", False))
        return real_launch(tuner, raw, *args, **kwargs)

    monkeypatch.setattr(launchers, "launch", launch_spy)
    monkeypatch.setenv("MUSIC_LOSS_WARP_SPECIALIZE", "1")
    if not launchers.use_warp_specialize(torch.device(DEVICE), "bf16"):
        pytest.skip("the warp-specialised variant needs sm_90 (or the interpreter)")
    z1, z2 = _views(n, d, seed=5)
    config = LossConfig(segment_dim=k)
    got = _triton_terms_and_grads(z1, z2, config, "bf16", chunk_size=chunk)
    chunks = -(-d // (chunk or d))
    assert flags == [d % 4 == 0] * chunks, flags  # fp32 rows here: 16 bytes is 4 floats
    if DEVICE == "cuda":
        _compare("bf16 warp-specialised vs float64", got, _float64_truth(z1, z2, config),
                 PRECISION_TOL["bf16"])
    else:
        _compare("bf16 warp-specialised (emulated) vs rounded oracle", got,
                 rounded_oracle(z1.cpu(), z2.cpu(), config), BF16_EMULATED_VS_ROUNDED_ORACLE)


def test_warp_specialize_is_honoured_only_where_the_variant_runs(monkeypatch):
    """``MUSIC_LOSS_WARP_SPECIALIZE=1`` turns the variant on in bf16 only, on sm_90 only
    (not sm_80, not sm_100, not the CPU), and under the interpreter; unset or ``0``: off."""
    from music_loss.kernels import launchers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    for flag in (None, "", "0"):
        if flag is None:
            monkeypatch.delenv("MUSIC_LOSS_WARP_SPECIALIZE", raising=False)
        else:
            monkeypatch.setenv("MUSIC_LOSS_WARP_SPECIALIZE", flag)
        for interpret in (True, False):
            monkeypatch.setattr(launchers, "INTERPRET", interpret)
            assert not launchers.use_warp_specialize(cuda, "bf16"), (flag, interpret)
    monkeypatch.setenv("MUSIC_LOSS_WARP_SPECIALIZE", "1")
    monkeypatch.setattr(launchers, "INTERPRET", True)
    assert launchers.use_warp_specialize(cpu, "bf16")
    assert not any(launchers.use_warp_specialize(cpu, p) for p in ("ieee", "tf32"))
    monkeypatch.setattr(launchers, "INTERPRET", False)
    assert launchers.use_warp_specialize(cuda, "bf16")
    assert not launchers.use_warp_specialize(cuda, "tf32")
    assert not launchers.use_warp_specialize(cpu, "bf16")
    for other in ((8, 0), (8, 9), (10, 0), (12, 0)):
        capability[0] = other
        assert not launchers.use_warp_specialize(cuda, "bf16"), other


def test_warp_specialize_refuses_a_pinned_config_it_cannot_run(monkeypatch):
    from music_loss.kernels import launchers
    from music_loss.kernels.configs import INTERPRET_JOINT_META

    monkeypatch.setenv("MUSIC_LOSS_WARP_SPECIALIZE", "1")
    if not launchers.use_warp_specialize(torch.device(DEVICE), "bf16"):
        pytest.skip("the warp-specialised variant needs sm_90 (or the interpreter)")
    p = torch.softmax(torch.randn(8, 4, 16, device=DEVICE), -1).reshape(8, 64)
    plan = JointPlan(16, 1.0, "bf16", joint_meta=dict(INTERPRET_JOINT_META))  # 64-row tiles
    with pytest.raises(ValueError, match="BLOCK_A=128.*MUSIC_LOSS_WARP_SPECIALIZE"):
        joint_entropy_pass(p, p.clone(), plan)


def test_descriptor_scratch_allocator_is_set_only_for_the_launch_and_keeps_the_callers():
    """The warp-specialised kernel builds descriptors in global scratch from Triton's
    allocator: the launcher provides one for its launches only, and keeps one the caller
    set."""
    from triton.runtime import _allocation

    from music_loss.kernels import launchers

    def current():
        return _allocation._allocator.get()

    assert isinstance(current(), _allocation.NullAllocator)
    with launchers._descriptor_scratch():
        assert current() is launchers._scratch
    assert isinstance(current(), _allocation.NullAllocator)

    def callers(size, alignment, stream):  # pragma: no cover - never called here
        raise AssertionError

    token = _allocation._allocator.set(callers)
    try:
        with launchers._descriptor_scratch():
            assert current() is callers
        assert current() is callers
    finally:
        _allocation._allocator.reset(token)
