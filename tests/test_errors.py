"""Every documented bad input raises a ValueError/TypeError that names the argument and the fix."""

from __future__ import annotations

import pytest
import torch

from music_loss import MUSICLoss, SegmentSoftmax, music_loss, segment_softmax
from music_loss.functional import invariance_term, joint_entropy_terms
from tests.tolerances import DTYPE_TOL, relative_error

Z = torch.randn(8, 12)

BAD_CALLS = {
    "rank-1": (lambda: music_loss(torch.randn(12), torch.randn(12), 3), ValueError, "z1 must have shape"),
    "rank-3": (lambda: music_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 3), 3), ValueError, "flatten"),
    "shapes-differ": (lambda: music_loss(Z, torch.randn(8, 15), 3), ValueError, "same shape"),
    "batch-differs": (lambda: music_loss(Z, torch.randn(7, 12), 3), ValueError, "same shape"),
    "d-not-multiple": (lambda: music_loss(Z, Z, 5), ValueError, "not a multiple of segment_dim"),
    "batch-of-one": (lambda: music_loss(Z[:1], Z[:1], 3), ValueError, "at least 2"),
    "integer-dtype": (lambda: music_loss(Z.long(), Z.long(), 3), TypeError, "floating-point"),
    "not-a-tensor": (lambda: music_loss(Z.numpy(), Z, 3), TypeError, "torch.Tensor"),
    "devices-differ": (lambda: music_loss(Z, Z.to("meta"), 3), ValueError, "same device"),
    "temperature-zero": (lambda: music_loss(Z, Z, 3, temperature=0.0), ValueError, "temperature"),
    "temperature-nan": (lambda: music_loss(Z, Z, 3, temperature=float("nan")), ValueError, "temperature"),
    "eps-negative": (lambda: music_loss(Z, Z, 3, eps=-1e-8), ValueError, "eps"),
    "eps-one": (lambda: music_loss(Z, Z, 3, eps=1.0), ValueError, "eps"),
    "segment-dim-zero": (lambda: music_loss(Z, Z, 0), ValueError, "segment_dim"),
    "segment-dim-float": (lambda: music_loss(Z, Z, 3.0), TypeError, "segment_dim"),
    "weight-string": (lambda: music_loss(Z, Z, 3, off_weight="1"), TypeError, "off_weight"),
    "normalization": (lambda: music_loss(Z, Z, 3, normalization="Eq5"), ValueError, "normalization"),
    "backend": (lambda: music_loss(Z, Z, 3, backend="cuda"), ValueError, "backend"),
    "precision": (lambda: music_loss(Z, Z, 3, precision="fp8"), ValueError, "precision"),
    "chunk-size": (lambda: music_loss(Z, Z, 3, chunk_size=0), ValueError, "chunk_size"),
    "gather-without-group": (lambda: music_loss(Z, Z, 3, gather_distributed=True), ValueError,
                             "init_process_group"),
    # Trainers build modules before the process group exists: the check is at the first call.
    "module-gather-without-group": (lambda: MUSICLoss(3, gather_distributed=True)(Z, Z), ValueError,
                                    "init_process_group"),
    "dtypes-differ": (lambda: music_loss(Z, Z.double(), 3), TypeError, "same dtype"),
    "dtypes-differ-reversed": (lambda: music_loss(Z.double(), Z, 3, backend="torch"), TypeError, "same dtype"),
    "dtypes-differ-half": (lambda: music_loss(Z.half(), Z, 3, backend="reference"), TypeError, "same dtype"),
    "entropy-terms-dtypes": (lambda: joint_entropy_terms(Z, Z.double(), 3), TypeError, "same dtype"),
    "zero-features": (lambda: music_loss(torch.randn(8, 0), torch.randn(8, 0), 3), ValueError, "no features"),
    "zero-features-softmax": (lambda: segment_softmax(torch.randn(8, 0), 3), ValueError, "no features"),
    "module-check-finite": (lambda: MUSICLoss(3, check_finite=True)(torch.full((4, 6), float("inf")), Z[:4, :6]),
                            ValueError, "NaN or inf"),
    "module-chunk-size": (lambda: MUSICLoss(3, chunk_size=-2), ValueError, "chunk_size"),
    "module-backend": (lambda: MUSICLoss(3, backend="cuda"), ValueError, "backend"),
    "uneven-batches-flag": (lambda: music_loss(Z, Z, 3, uneven_batches="yes"), TypeError, "uneven_batches"),
    "module-normalization": (lambda: MUSICLoss(3, normalization="full"), ValueError, "normalization"),
    "module-temperature": (lambda: MUSICLoss(3, temperature=-1.0), ValueError, "temperature"),
    "softmax-d": (lambda: segment_softmax(Z, 5), ValueError, "segment_dim"),
    "softmax-module-eps": (lambda: SegmentSoftmax(3, eps=-0.1), ValueError, "eps"),
    "entropy-terms-shape": (lambda: joint_entropy_terms(Z, Z[:, :9], 3), ValueError, "same shape"),
    "invariance-term-dtype": (lambda: invariance_term(Z.int(), Z.int(), 3), TypeError, "floating"),
    "check-finite": (lambda: music_loss(torch.full((4, 6), float("nan")), Z[:4, :6], 3,
                                        check_finite=True), ValueError, "NaN or inf"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_input_raises_a_clear_error(case):
    call, error, phrase = BAD_CALLS[case]
    with pytest.raises(error, match=phrase):
        call()


def test_triton_backend_without_cuda_or_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run here.*CUDA"):
        music_loss(Z, Z, 3, backend="triton")


def test_triton_backend_refuses_float64_with_the_fix():
    with pytest.raises(ValueError, match="backend='torch' for float64"):
        music_loss(Z.double(), Z.double(), 3, backend="triton")


def test_module_with_gather_distributed_is_constructible_before_the_process_group():
    # Lightning and most trainers build the module first, then start DDP.
    loss_fn = MUSICLoss(3, gather_distributed=True)
    assert loss_fn.gather_distributed


def test_default_segment_dim_is_80_everywhere():
    z = torch.randn(4, 160)
    p = segment_softmax(z)
    assert torch.allclose(p.view(4, 2, 80).sum(-1), torch.ones(4, 2))
    assert torch.equal(SegmentSoftmax()(z), p)
    assert SegmentSoftmax().segment_dim == 80
    h80 = joint_entropy_terms(p, p)
    assert all(torch.equal(a, b) for a, b in zip(h80, joint_entropy_terms(p, p, 80)))
    assert not torch.equal(h80[1], joint_entropy_terms(p, p, 40)[1])
    assert torch.equal(invariance_term(p, p), invariance_term(p, p, 80))
    assert not torch.equal(invariance_term(p, p), invariance_term(p, p, 16))
    assert MUSICLoss().segment_dim == 80


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_torch_func_transforms_say_they_are_not_supported(backend, transform):
    z1, z2 = torch.randn(3, 8, 12), torch.randn(3, 8, 12)
    fn = lambda a, b: music_loss(a, b, 3, backend=backend)
    with pytest.raises(NotImplementedError, match="torch.func transforms.*backend='reference'"):
        if transform == "vmap":
            torch.func.vmap(fn)(z1, z2)
        else:
            torch.func.grad(fn)(z1[0], z2[0])


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_torch_func_transforms_work_on_the_reference(transform):
    z1, z2 = torch.randn(3, 8, 12, dtype=torch.float64), torch.randn(3, 8, 12, dtype=torch.float64)
    fn = lambda a, b: music_loss(a, b, 3, backend="reference")
    if transform == "vmap":
        got = torch.func.vmap(fn)(z1, z2)
        want = torch.stack([fn(a, b) for a, b in zip(z1, z2)])
        assert torch.allclose(got, want, rtol=1e-12)
    else:
        got = torch.func.grad(fn)(z1[0], z2[0])
        a = z1[0].clone().requires_grad_(True)
        (want,) = torch.autograd.grad(fn(a, z2[0]), a)
        assert torch.allclose(got, want, rtol=1e-10)


def test_module_repr_shows_what_changes_the_loss():
    plain = repr(MUSICLoss())
    assert plain == ("MUSICLoss(segment_dim=80, temperature=1.0, eps=1e-08, "
                     "normalization='blocks', backend='auto', precision='auto')")
    custom = repr(MUSICLoss(40, off_weight=0.5, gather_distributed=True, shard=False,
                            uneven_batches=True, chunk_size=256, check_finite=True))
    for part in ("segment_dim=40", "off_weight=0.5", "gather_distributed=True", "shard=False",
                 "uneven_batches=True", "chunk_size=256", "check_finite=True"):
        assert part in custom, custom
    assert "diag_weight" not in custom  # defaults stay out


# ---------------------------------------------------------------------------------------
# Module knobs: validated on assignment as at construction; numbers of every kind
# ---------------------------------------------------------------------------------------
BAD_ASSIGNMENTS = [
    ("chunk_size", -3, ValueError), ("chunk_size", 0, ValueError), ("chunk_size", 2.5, ValueError),
    ("backend", "foo", ValueError), ("precision", "fp8", ValueError),
    ("temperature", 0.0, ValueError), ("temperature", torch.ones(2), TypeError),
    ("temperature", "1", TypeError), ("eps", -1.0, ValueError), ("segment_dim", 0, ValueError),
    ("diag_weight", float("inf"), ValueError), ("normalization", "Eq5", ValueError),
    ("shard", 1, TypeError), ("check_finite", "yes", TypeError),
    ("uneven_batches", None, TypeError), ("gather_distributed", 0, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD_ASSIGNMENTS,
                         ids=[f"{n}={v!r}"[:30] for n, v, _ in BAD_ASSIGNMENTS])
def test_module_knobs_validate_on_assignment(name, value, error):
    loss_fn = MUSICLoss(3)
    before = loss_fn(Z, Z)
    with pytest.raises(error, match=name):
        setattr(loss_fn, name, value)
    assert torch.equal(loss_fn(Z, Z), before)  # a refused assignment changes nothing


def test_temperature_schedule_on_the_module():
    import numpy as np

    loss_fn = MUSICLoss(3)
    for value in (0.5, np.float32(0.25), torch.tensor(0.125, dtype=torch.float64), np.int64(2)):
        loss_fn.temperature = value
        assert isinstance(loss_fn.temperature, float) and loss_fn.temperature == float(value)
        want = music_loss(Z, Z, 3, temperature=float(value))
        assert torch.equal(loss_fn(Z, Z), want)
    loss_fn.chunk_size = np.int64(4)
    assert loss_fn.chunk_size == 4 and type(loss_fn.chunk_size) is int
    softmax = SegmentSoftmax(4)
    softmax.temperature = np.float64(2.0)
    assert torch.equal(softmax(Z), segment_softmax(Z, 4, temperature=2.0))
    with pytest.raises(ValueError, match="eps"):
        softmax.eps = -1.0


def test_numbers_may_be_numpy_scalars_or_zero_dim_tensors():
    import numpy as np

    want = music_loss(Z, Z, 3, temperature=0.5, off_weight=2.0)
    for t, w in ((np.float32(0.5), np.float64(2.0)), (torch.tensor(0.5), torch.tensor(2))):
        assert torch.equal(music_loss(Z, Z, np.int64(3), temperature=t, off_weight=w), want)
    with pytest.raises(TypeError, match="0-dim tensor"):
        music_loss(Z, Z, 3, temperature=torch.tensor([0.5, 0.5]))


def test_at_least_one_sample_is_singular():
    with pytest.raises(ValueError, match="at least 1 sample,"):
        joint_entropy_terms(Z[:0], Z[:0], 3)


def test_meta_tensors_under_autocast():
    z = torch.randn(8, 12, device="meta", requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MUSICLoss(3)(z, z)
    loss.backward()
    assert loss.device.type == "meta" and loss.shape == () and z.grad.shape == z.shape


def test_reference_backend_honours_precision():
    """bf16 rounds the joint matrix's operands as the torch backend does; tf32 changes
    nothing on CPU (no tf32 there)."""
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    got = {p: music_loss(z1, z2, 8, backend="reference", precision=p) for p in
           ("ieee", "tf32", "bf16")}
    torch_bf16 = music_loss(z1, z2, 8, backend="torch", precision="bf16")
    assert torch.equal(got["tf32"], got["ieee"])
    assert not torch.equal(got["bf16"], got["ieee"])
    # The rounding moves the value, and moves it to where the torch backend's bf16 mode is.
    assert 10 * abs(float(got["bf16"] - torch_bf16)) < abs(float(got["ieee"] - torch_bf16))


def test_check_finite_under_torch_compile_is_a_device_assertion():
    loss_fn = MUSICLoss(3, backend="torch", check_finite=True)
    step = torch.compile(lambda a, b: loss_fn(a, b), fullgraph=True)
    # Compiled kernels may sum in another order: equal to eager within float32's tolerance.
    assert relative_error(step(Z, Z), loss_fn(Z, Z)) <= DTYPE_TOL[torch.float32].loss
    bad = Z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        step(bad, Z)
