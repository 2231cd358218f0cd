"""Launchers of the fused kernels: the segment softmax forward, the joint pass (chunks of
rows of ``P``, each a joint-kernel launch and the two gradient products), and the backward.

On a GPU the joint kernel and the products autotune over :mod:`music_loss.kernels.configs`;
under the interpreter, or when a caller pins a config, the raw kernels run with fixed
meta-parameters. TMA descriptors replace pointers where :func:`use_tma` says so.

Warp specialisation (opt-in, ``MUSIC_LOSS_WARP_SPECIALIZE=1``): on sm_90, in bf16, the joint
kernel can run its warp-specialised variant (``WARP_SPECIALIZE``: a producer warp group issuing
TMA copies, two consumer warp groups running ``wgmma`` and the epilogue, 128-row tiles of
:data:`~music_loss.kernels.configs.WS_JOINT_CONFIGS`); see :func:`use_warp_specialize`. Off
by default: a GPU timing decides whether it becomes the default.

Workspace of the joint pass, beyond the ``O(N D)`` arrays ``p1, p2`` and ``dp1, dp2``::

    chunk_size * D * (4 bytes, or 2 in bf16 mode)      the G chunk
  + 2 * 4 * ceil(chunk_size / 16) * ceil(D / 16)        per-tile partial sums
  + 4 * D                                               diag(P)

(the warp-specialised joint kernel's partial sums are per row of its tiles:
``2 * 4 * 128 ceil(chunk_size / 128) * ceil(D / 64)`` bytes), with ``chunk_size`` from
:func:`~music_loss.kernels.configs.chunk_size_for`: as ``D`` grows the chunk keeps about
``N`` rows, so the workspace is ``O(N D)``, never ``D^2``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from music_loss.kernels import configs as _configs
from music_loss.kernels._common import (
    INTERPRET,
    check_precision,
    emulate_tensor_cores,
    launch,
    needs_int64,
)
from music_loss.kernels.configs import (
    INTERPRET_JOINT_META,
    INTERPRET_MATMUL_META,
    INTERPRET_WS_JOINT_META,
    JOINT_CONFIGS,
    MATMUL_CONFIGS,
    MIN_TILE,
    WS_JOINT_CONFIGS,
    chunk_size_for,
    configs_for,
    meta_of,
    prune_configs,
)
from music_loss.kernels.joint_entropy import (
    joint_entropy_kernel,
    scaled_matmul_kernel,
    scaled_matmul_tma_kernel,
)
from music_loss.kernels.segment_softmax import (
    music_loss_bwd_kernel,
    segment_softmax_fwd_kernel,
    softmax_blocks,
)

# ---------------------------------------------------------------------------------------
# Autotuners (GPU only: the interpreter runs the raw kernels with a fixed config).
# ---------------------------------------------------------------------------------------
_JOINT_KEY = ["N", "D", "chunk_len", "PRECISION", "WRITE_G", "FAST_LOG"]


def _joint_tma_block_shapes(nargs: dict[str, Any]) -> None:
    """Config pre-hook of the TMA joint kernel: descriptor tiles of the config being run
    (``[BLOCK_N, BLOCK_A]`` of ``p1``, ``[BLOCK_N, BLOCK_B]`` of ``p2``)."""
    ba, bb, bn = nargs["BLOCK_A"], nargs["BLOCK_B"], nargs["BLOCK_N"]
    nargs["p1_ptr"].block_shape = [bn, ba]
    nargs["p2_ptr"].block_shape = [bn, bb]


def _tma_block_shapes(nargs: dict[str, Any]) -> None:
    """Config pre-hook of the TMA products: descriptor tiles of the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_KMAJOR"] else [bk, bn]
    nargs["c_desc"].block_shape = [bm, bn]


def _with_hook(configs: list[triton.Config], hook: Any) -> list[triton.Config]:
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                          pre_hook=hook) for c in configs]


def _matmul_autotuner(kernel: Any, configs: list[triton.Config], key: list[str],
                      restore_output: bool) -> Any:
    # An accumulating product (``dp2 +=``) needs its output restored between the benchmark
    # runs of its configs, and the copy is timed with each run: only that variant pays for it.
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": prune_configs},
                           restore_value=["c_ptr"] if restore_output else None)(kernel)


def _autotuners() -> dict[str, Any]:
    joint = {"early_config_prune": prune_configs}
    # The pointer products' key holds the strides: the same sizes with transposed operands
    # (dp1's NT layout against dp2's) are different kernels for the memory system.
    key = ["M", "N", "K", "PRECISION", "stride_am", "stride_ak", "stride_bk", "stride_bn"]
    tma_key = ["M", "N", "K", "PRECISION", "B_KMAJOR"]
    tma_configs = _with_hook(MATMUL_CONFIGS, _tma_block_shapes)
    return {
        "joint": triton.autotune(configs=JOINT_CONFIGS, key=_JOINT_KEY,
                                 prune_configs_by=joint)(joint_entropy_kernel),
        "joint_tma": triton.autotune(configs=_with_hook(JOINT_CONFIGS, _joint_tma_block_shapes),
                                     key=_JOINT_KEY, prune_configs_by=joint)(joint_entropy_kernel),
        "joint_ws": triton.autotune(configs=WS_JOINT_CONFIGS, key=_JOINT_KEY,
                                    prune_configs_by=joint)(joint_entropy_kernel),
        "product": _matmul_autotuner(scaled_matmul_kernel, MATMUL_CONFIGS, key, False),
        "product_accumulate": _matmul_autotuner(scaled_matmul_kernel, MATMUL_CONFIGS, key, True),
        "product_tma": _matmul_autotuner(scaled_matmul_tma_kernel, tma_configs, tma_key, False),
        "product_tma_accumulate": _matmul_autotuner(scaled_matmul_tma_kernel, tma_configs,
                                                    tma_key, True),
    }


class _TunersPerSmemLimit(Mapping[str, Any]):
    """The autotuners of the current device's per-block shared-memory limit, one set per
    limit. Triton's autotune cache is keyed by the launch's arguments only: on a machine
    with two different cards one set would hand the second card the config the first one
    picked, which may not fit it (the pruning by the device's limit runs on a cache miss)."""

    def __init__(self) -> None:
        self.per_limit: dict[int, dict[str, Any]] = {}

    def _current(self) -> dict[str, Any]:
        limit = _configs.device_smem_limit()
        if limit not in self.per_limit:
            self.per_limit[limit] = _autotuners()
        return self.per_limit[limit]

    def __getitem__(self, name: str) -> Any:
        return self._current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


#: The GPU autotuners by name, of the current device's shared-memory limit (empty under the
#: interpreter, which does not autotune); their ``cache`` holds each tuning key's config.
AUTOTUNERS: Mapping[str, Any] = {} if INTERPRET else _TunersPerSmemLimit()


# ---------------------------------------------------------------------------------------
# TMA (opt-in) and the gradient products.
# ---------------------------------------------------------------------------------------
def tma_available() -> bool:
    """True when this Triton has host-side tensor descriptors (triton >= 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # pragma: no cover - older Triton: the pointer kernels
        return False
    return True


def use_tma(device: torch.device, precision: str) -> bool:
    """Whether the joint product and the gradient products go through TMA descriptors here.

    Only tensor-core modes on sm_90 or newer (TMA is Hopper's), with a Triton that has
    descriptors, and only when asked (``MUSIC_LOSS_TMA=1``; under the interpreter too, which
    emulates descriptors). Opt-in: the pointer kernels stay the default until GPU timings
    (``make gpu-validate``) show the descriptor path is faster.
    """
    if precision == "ieee" or os.environ.get("MUSIC_LOSS_TMA", "0") in ("", "0"):
        return False
    if not tma_available():
        return False
    if INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def use_warp_specialize(device: torch.device, precision: str) -> bool:
    """Whether the joint product runs the warp-specialised joint kernel here.

    Only when asked (``MUSIC_LOSS_WARP_SPECIALIZE=1``), in bf16 (the one mode whose variant
    compiles with a producer/consumer split and no spill: tf32's operands fail Hopper's
    warp specialiser), on sm_90 (the variant is built for Hopper's warp specialiser and
    ``wgmma``), with a Triton that builds tensor descriptors in the kernel; under the
    interpreter too (which runs the same indexing, one program at a time). Opt-in: the
    default kernel stays until a GPU timing shows the variant is faster.

    Example:
        >>> use_warp_specialize(torch.device("cpu"), "tf32")
        False
    """
    if precision != "bf16" or os.environ.get("MUSIC_LOSS_WARP_SPECIALIZE", "0") in ("", "0"):
        return False
    if not hasattr(tl, "make_tensor_descriptor"):  # pragma: no cover - older Triton
        return False
    if INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """Global memory for the tensor descriptors a kernel builds (Triton's allocator)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


@contextlib.contextmanager
def _descriptor_scratch() -> Iterator[None]:
    """Launches inside get :func:`_scratch` as Triton's allocator, unless the caller set
    one (theirs is kept); the previous allocator is restored on exit."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator
        unset = isinstance(current.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # pragma: no cover - another Triton layout
        triton.set_allocator(_scratch)
        yield
        return
    if not unset:
        yield
        return
    token = current.set(_scratch)
    try:
        yield
    finally:
        current.reset(token)


def _tma_ready(*tensors: Tensor) -> bool:
    """TMA's layout rules: unit last stride, 16-byte aligned base and other strides."""
    for t in tensors:
        item = t.element_size()
        if t.stride(-1) != 1 or (t.data_ptr() % 16) or any((st * item) % 16
                                                            for st in t.stride()[:-1]):
            return False
    return True


def _matmul_tma(a: Tensor, b: Tensor, c: Tensor, alpha: float, accumulate: bool,
                precision: str, meta: dict[str, Any] | None) -> bool:
    """``c (+)= alpha * a @ b`` through TMA descriptors; False (nothing launched) when an
    operand breaks TMA's layout rules, for the pointer kernel to take over."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b_kmajor = b.stride(0) == 1 and b.stride(1) != 1  # B^T is contiguous along K
    b_stored = b.T if b_kmajor else b
    if not _tma_ready(a, b_stored, c):
        return False
    m, k = a.shape
    n = b.shape[1]
    placeholder = [16, 16]  # set per config (the pre-hook, or below for a pinned config)
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), placeholder)
    b_desc = TensorDescriptor(b_stored, list(b_stored.shape), list(b_stored.stride()),
                              placeholder)
    c_desc = TensorDescriptor(c, list(c.shape), list(c.stride()), placeholder)
    args = (a_desc, b_desc, c_desc, c, m, n, k, alpha)
    kwargs = {"ACCUMULATE": accumulate, "PRECISION": precision,
              "EMULATE_BF16": emulate_tensor_cores(), "B_KMAJOR": b_kmajor,
              "EMULATE_TF32": emulate_tensor_cores()}
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    fixed = None
    if meta is not None or INTERPRET:
        fixed = dict(meta or INTERPRET_MATMUL_META)
        _tma_block_shapes({"a_desc": a_desc, "b_desc": b_desc, "c_desc": c_desc,
                           "B_KMAJOR": b_kmajor, **fixed})
    tuner = AUTOTUNERS.get("product_tma_accumulate" if accumulate else "product_tma")
    launch(tuner, scaled_matmul_tma_kernel, grid, fixed, *args, **kwargs)
    return True


def _matmul(a: Tensor, b: Tensor, c: Tensor, alpha: float, accumulate: bool, precision: str,
            meta: dict[str, Any] | None, kmajor_staging: bool = False) -> None:
    """``c (+)= alpha * a @ b`` with the Triton product (``c`` fp32, any strides): through
    TMA descriptors where :func:`use_tma` says so and the layouts allow, else pointers.
    ``kmajor_staging`` (``b`` row-major, tf32 on sm_90/sm_100): the pointer kernel forms ``b``'s
    K-major tiles on chip (TMA tiles would land in memory order, the wrong one)."""
    if not kmajor_staging and use_tma(a.device, precision) and _matmul_tma(
            a, b, c, alpha, accumulate, precision, meta):
        return
    m, k = a.shape
    n = b.shape[1]
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    tuner = AUTOTUNERS.get("product_accumulate" if accumulate else "product")
    launch(tuner, scaled_matmul_kernel, grid, meta,
           a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
           c.stride(0), c.stride(1), alpha,
           ACCUMULATE=accumulate, PRECISION=precision, EMULATE_BF16=emulate_tensor_cores(),
           USE_INT64=needs_int64(a, b, c), EMULATE_TF32=emulate_tensor_cores(),
           KMAJOR_STAGING=kmajor_staging)


def kmajor_staging(device: torch.device, precision: str) -> bool:
    """Whether tf32 products form their K-major operands on chip: where the tensor cores read
    fp32 operands from shared memory K-major only (Hopper's ``wgmma``, sm_90; datacenter
    Blackwell's ``tcgen05.mma``, sm_100/103), and in the interpreter (which runs the same
    indexing, so the CPU tests cover it). Elsewhere (``mma.sync``: sm_80 to sm_89, sm_120;
    operands in registers, any order) the plain row-major tiles are best.

    Example:
        >>> kmajor_staging(torch.device("cpu"), "ieee")
        False
    """
    if precision != "tf32":
        return False
    if INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


def _dp2_product(p1_cols: Tensor, g_chunk: Tensor, dp2: Tensor, alpha: float,
                 accumulate: bool, precision: str, meta: dict[str, Any] | None) -> None:
    """``dp2 (+)= alpha * p1[:, a0:a1] @ G_chunk``. ``G`` (row-major) reduces over its rows:
    where :func:`kmajor_staging` holds its tiles are made K-major on chip (the pointer
    kernel's ``KMAJOR_STAGING``)."""
    staging = kmajor_staging(dp2.device, precision)
    _matmul(p1_cols, g_chunk, dp2, alpha, accumulate, precision, meta, kmajor_staging=staging)


# ---------------------------------------------------------------------------------------
# The joint pass.
# ---------------------------------------------------------------------------------------
class JointPlan(NamedTuple):
    """What :func:`joint_entropy_pass` computes, and how it launches.

    Attributes:
        segment_dim: ``K``.
        c_off: Coefficient of ``H_off`` in the gradient products (1.0 for the raw sums'
            gradient; not 0 when ``grads`` asks for a product).
        precision: ``"ieee"``, ``"tf32"`` or ``"bf16"`` for the three products.
        grads: Which of the off-block gradient products ``dp1``, ``dp2`` to form; one not
            formed is returned empty (a view without grad). ``(False, False)``: sums only.
        chunk_size: Rows of ``P`` per chunk (``None``: :func:`chunk_size_for` of the batch).
        p_rows: Only the rows ``(p_row_start, p_row_stop)`` of ``P`` (sharding): the sums
            cover those rows, ``dp1`` is complete in its columns ``p_row_start:p_row_stop``
            (0 elsewhere), ``dp2`` is their partial sum, and ``p_diag`` holds ``P[a, a]``
            for ``a`` in the range (0 elsewhere). ``None``: all ``D``.
        joint_meta: Pin the joint kernel's config (interpreter default: a fixed one).
        matmul_meta: Pin the products' config.
        round_tf32: In tf32 mode, store ``G`` rounded to nearest tf32 (``False`` only to
            measure the truncation bias; ``p1, p2`` are rounded by the softmax kernel).
        fast_log: In tf32/bf16 mode, take the epilogue's log from the special-function
            unit (``lg2.approx.f32``; ``False``: libdevice's accurate ``logf``, to measure
            the difference). ieee always uses the accurate log.

    Example:
        >>> JointPlan(segment_dim=80, c_off=1.0, precision="tf32").grads
        (False, False)
    """

    segment_dim: int
    c_off: float
    precision: str
    grads: tuple[bool, bool] = (False, False)
    chunk_size: int | None = None
    p_rows: tuple[int, int] | None = None
    joint_meta: dict[str, Any] | None = None
    matmul_meta: dict[str, Any] | None = None
    round_tf32: bool = True
    fast_log: bool = True


class JointPass(NamedTuple):
    """Result of :func:`joint_entropy_pass`.

    Attributes:
        h_diag: float64 scalar ``sum_a P_aa lg P_aa``.
        h_off: float64 scalar ``sum_{off blocks} P lg P``.
        p_diag: fp32 ``(D,)``, the diagonal of ``P``.
        dp1: fp32 ``(N, D)`` ``c_off p2 G^T / N`` (``G = lg P + [P >= tiny]`` on the off
            blocks, 0 elsewhere), or an empty tensor.
        dp2: fp32 ``(N, D)`` ``c_off p1 G / N``, or an empty tensor.
    """

    h_diag: Tensor
    h_off: Tensor
    p_diag: Tensor
    dp1: Tensor
    dp2: Tensor


def _metas(plan: JointPlan, warp_specialize: bool = False
           ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The joint kernel's and the products' fixed configs (``None``: autotune);
    ``warp_specialize``: the joint kernel is the warp-specialised variant."""
    joint_meta, matmul_meta = plan.joint_meta, plan.matmul_meta
    joint_configs = WS_JOINT_CONFIGS if warp_specialize else JOINT_CONFIGS
    if INTERPRET:
        joint_meta = joint_meta or (INTERPRET_WS_JOINT_META if warp_specialize
                                    else INTERPRET_JOINT_META)
        matmul_meta = matmul_meta or INTERPRET_MATMUL_META
    elif torch.are_deterministic_algorithms_enabled():
        # Autotuning picks by timing, so two processes could tile differently and round
        # differently: deterministic mode pins each kernel's first config instead.
        joint_meta = joint_meta or meta_of(configs_for(joint_configs, plan.precision)[0])
        matmul_meta = matmul_meta or meta_of(configs_for(MATMUL_CONFIGS, plan.precision)[0])
    if joint_meta is not None and min(joint_meta["BLOCK_A"], joint_meta["BLOCK_B"]) < MIN_TILE:
        raise ValueError(f"joint_meta tiles must be at least {MIN_TILE} wide (the partial-sum "
                         f"buffer is sized for that), got {joint_meta}")
    if warp_specialize and joint_meta is not None and (
            joint_meta["BLOCK_A"] != WS_TILE_ROWS or joint_meta["BLOCK_B"] < WS_MIN_COLUMNS):
        raise ValueError(f"joint_meta: the warp-specialised joint kernel "
                         f"(MUSIC_LOSS_WARP_SPECIALIZE=1) takes BLOCK_A={WS_TILE_ROWS} and "
                         f"BLOCK_B >= {WS_MIN_COLUMNS}, got {joint_meta}; pin such a config or "
                         f"unset MUSIC_LOSS_WARP_SPECIALIZE")
    return joint_meta, matmul_meta


#: Tile rows of the warp-specialised joint kernel (two consumers of 64) and its narrowest
#: tile: they size its per-row partial sums.
WS_TILE_ROWS = 128
WS_MIN_COLUMNS = 64


def joint_entropy_pass(p1: Tensor, p2: Tensor, plan: JointPlan,
                       out: tuple[Tensor | None, Tensor | None] | None = None) -> JointPass:
    """Entropy sums of ``P = p1^T p2 / N`` and, if the plan asks, the off-block gradient
    products, chunk by chunk of rows of ``P``, never storing ``P``.

    Every kernel reads ``p1``, ``p2`` and the ``G`` chunk as stored, in every precision
    mode: no transposed copies (see :mod:`music_loss.kernels.joint_entropy` for how tf32
    meets the tensor cores' K-major rule).

    Args:
        p1: ``(N, D)`` probabilities of view 1, contiguous, fp32 (bf16 in bf16 mode).
        p2: Same for view 2.
        plan: What to compute and how (:class:`JointPlan`).
        out: fp32 contiguous ``(N, D)`` arrays to receive ``dp1, dp2`` (``None`` in a slot, or
            no ``out``: allocated here). ``dp1`` may be ``p1`` itself (fp32 operands): each
            chunk's columns of ``p1`` are last read by that chunk's ``dp2`` product, which
            runs before ``dp1``'s overwrites them; columns outside ``p_rows`` are zeroed.

    Returns:
        A :class:`JointPass`.

    Example:
        >>> import os, torch
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     p = torch.softmax(torch.randn(8, 4, 3), -1).reshape(8, 12)
        ...     out = joint_entropy_pass(p, p.clone(), JointPlan(3, 1.0, "ieee"))
        ...     assert float(out.h_diag) <= 0 and out.dp1.numel() == 0
    """
    precision = check_precision(plan.precision)
    n, d = p1.shape
    if not (p1.is_contiguous() and p2.is_contiguous()):
        raise ValueError("p1 and p2 must be contiguous (the softmax kernel writes them so)")
    dev = p1.device
    # The warp-specialised variant builds TMA descriptors of p1, p2 in the kernel: their
    # layout rules apply.
    joint_ws = use_warp_specialize(dev, precision) and _tma_ready(p1, p2)
    joint_meta, matmul_meta = _metas(plan, joint_ws)
    chunk_size = plan.chunk_size or chunk_size_for(d, precision, n)
    p_row_start, p_row_stop = plan.p_rows if plan.p_rows is not None else (0, d)
    # A partial row range leaves entries unwritten: they must read 0, not garbage.
    alloc = torch.empty if (p_row_start, p_row_stop) == (0, d) else torch.zeros
    p_diag = alloc(d, device=dev, dtype=torch.float32)
    want1, want2 = plan.grads
    write_grad = want1 or want2
    if write_grad and plan.c_off == 0.0:
        raise ValueError("plan.c_off must be nonzero when plan.grads asks for a product "
                         "(with c_off == 0 both products are 0: pass grads=(False, False))")
    out1, out2 = out if out is not None else (None, None)
    for name, buf, want in (("dp1", out1, want1), ("dp2", out2, want2)):
        if buf is not None and (not want or buf.shape != (n, d) or buf.dtype != torch.float32
                                or not buf.is_contiguous()):
            raise ValueError(f"out's {name} must be a contiguous fp32 ({n}, {d}) array, given "
                             f"only when plan.grads asks for it")
    # distinct tensors: custom ops forbid aliases
    dp1 = out1 if out1 is not None else alloc((n, d) if want1 else (0,), device=dev,
                                              dtype=torch.float32)
    dp2 = out2 if out2 is not None else alloc((n, d) if want2 else (0,), device=dev,
                                              dtype=torch.float32)
    workspace = torch.empty((min(chunk_size, d), d) if write_grad else (0,), device=dev,
                            dtype=p1.dtype)
    strides = (p1.stride(0), 1, p2.stride(0), 1)  # (stride_p1n, stride_p1a, stride_p2n, _p2b)
    tuner, operands = AUTOTUNERS.get("joint"), (p1, p2)
    # tf32's joint product keeps the pointer kernel: TMA tiles of the row-major arrays land
    # in shared memory in memory order, and the K-major copy tf32 wgmma then needs is 8- to
    # 16-way bank conflicted (``python -m benchmarks.aot``).
    joint_tma = (not joint_ws and precision != "tf32" and use_tma(dev, precision)
                 and _tma_ready(p1, p2))
    if joint_ws:
        tuner = AUTOTUNERS.get("joint_ws")
    if joint_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        operands = tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])
                         for t in (p1, p2))
        tuner = AUTOTUNERS.get("joint_tma")
        if joint_meta is not None:
            _joint_tma_block_shapes({"p1_ptr": operands[0], "p2_ptr": operands[1],
                                     **joint_meta})
    # What every chunk's launch shares: outputs (G, diag(P); without gradients G points at
    # p_diag), sizes, layout, and the constexprs.
    outputs = (workspace if write_grad else p_diag, p_diag)
    layout = (*strides, d)
    constexprs = {"WRITE_G": write_grad, "PRECISION": precision,
                  "EMULATE_BF16": emulate_tensor_cores(), "EMULATE_TF32": emulate_tensor_cores(),
                  "ROUND_TF32": plan.round_tf32, "USE_INT64": needs_int64(p1, p2),
                  "FAST_LOG": plan.fast_log, "USE_TMA": joint_tma,
                  "KMAJOR_STAGING": kmajor_staging(dev, precision)}
    if joint_ws:  # only then: the default launch's arguments stay as they were
        constexprs["WARP_SPECIALIZE"] = True
    sums: list[Tensor] = []
    scale = plan.c_off / n  # G holds lg P + [P >= tiny]; the products apply c_off / N
    # One partial-sum buffer for every chunk: each chunk's sums are read (in stream order)
    # before the next chunk's launch writes it.
    slots = triton.cdiv(min(chunk_size, p_row_stop - p_row_start), MIN_TILE) * triton.cdiv(
        d, MIN_TILE)
    if joint_ws:  # per-row sums: one per row of each tile
        slots = triton.cdiv(min(chunk_size, p_row_stop - p_row_start), WS_TILE_ROWS) * (
            WS_TILE_ROWS * triton.cdiv(d, WS_MIN_COLUMNS))
    partial = torch.empty((2, slots) if p_row_stop > p_row_start else (0,), device=dev,
                          dtype=torch.float32)
    for a0 in range(p_row_start, p_row_stop, chunk_size):
        rows = min(chunk_size, p_row_stop - a0)
        grid = lambda cfg, rows=rows: (triton.cdiv(rows, cfg["BLOCK_A"])
                                       * triton.cdiv(d, cfg["BLOCK_B"]),)
        with _descriptor_scratch() if joint_ws and not INTERPRET else contextlib.nullcontext():
            used = launch(tuner, joint_entropy_kernel, grid, joint_meta, *operands, *outputs,
                          partial, n, d, plan.segment_dim, a0, rows, *layout, slots, 1.0 / n,
                          **constexprs)
        tiles = triton.cdiv(rows, used["BLOCK_A"]) * triton.cdiv(d, used["BLOCK_B"])
        if joint_ws:
            tiles *= used["BLOCK_A"]
        sums.append(partial[:, :tiles].sum(dim=1, dtype=torch.float64))
        if write_grad:
            g_chunk = workspace[:rows]
            # dp2 (+)= c p1[:, a0:a1] @ G_chunk, then dp1[:, a0:a1] = c p2 @ G_chunk^T
            # (in that order: dp1 may overwrite those columns of p1)
            if want2:
                _dp2_product(p1[:, a0:a0 + rows], g_chunk, dp2, scale, a0 > p_row_start,
                             precision, matmul_meta)
            if want1:
                _matmul(p2, g_chunk.T, dp1[:, a0:a0 + rows], scale, False, precision,
                        matmul_meta)
    if out1 is not None and (p_row_start, p_row_stop) != (0, d):
        # dp1 is 0 outside the rows of P formed (a given array may hold anything there,
        # p1's columns if it is p1)
        dp1[:, :p_row_start].zero_()
        dp1[:, p_row_stop:].zero_()
    if want2 and out2 is not None and p_row_stop <= p_row_start:
        dp2.zero_()
    # No rows (a rank that owns no segment): both sums are 0.
    total = (torch.stack(sums).sum(dim=0) if sums
             else torch.zeros(2, device=dev, dtype=torch.float64))
    return JointPass(total[0], total[1], p_diag, dp1, dp2)


# ---------------------------------------------------------------------------------------
# The segment softmax forward and the loss's backward.
# ---------------------------------------------------------------------------------------
def softmax_forward(
    z1: Tensor, z2: Tensor | None, segment_dim: int, temperature: float, eps: float,
    out_dtype: torch.dtype = torch.float32, local_rows: tuple[int, int] | None = None,
    round_bf16: bool = False, round_tf32: bool = False, out1: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Segment softmax of one or two views; with two, the invariance partial sums too.

    Returns:
        ``(p1, p2, inv_partials)``: ``p`` as contiguous ``(N, D)`` arrays of ``out_dtype``
        (``p1`` written into ``out1`` when given: a contiguous ``(N, D)`` ``out_dtype`` array)
        (fp32 values rounded once on store; ``round_bf16``: to bf16 values, kept in
        ``out_dtype``; ``round_tf32``: to the nearest tf32 values, for tf32 products), and
        an ``(N, blocks)`` fp32 array whose sum is ``sum_{local i, s} lg(sum_k p1 p2)`` over
        the batch rows ``local_rows`` (``None`` for one view).

    Example:
        >>> import os, torch
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     p, _, _ = softmax_forward(torch.randn(2, 6), None, 3, 1.0, 0.0)
        ...     assert torch.allclose(p.view(2, 2, 3).sum(-1), torch.ones(2, 2))
    """
    n, d = z1.shape
    s = d // segment_dim
    two = z2 is not None
    local_start, local_stop = local_rows if local_rows is not None else (0, n)
    zb = z2 if z2 is not None else z1
    if out1 is not None and (out1.shape != (n, d) or out1.dtype != out_dtype
                             or not out1.is_contiguous()):
        raise ValueError(f"out1 must be a contiguous ({n}, {d}) {out_dtype} array")
    p1 = out1 if out1 is not None else torch.empty((n, d), device=z1.device, dtype=out_dtype)
    p2 = torch.empty((n, d), device=z1.device, dtype=out_dtype) if two else None
    meta = softmax_blocks(segment_dim, s)
    grid = (n, triton.cdiv(s, meta["BLOCK_S"]))
    inv = torch.empty(grid, device=z1.device, dtype=torch.float32) if two else None
    segment_softmax_fwd_kernel[grid](
        z1, zb, p1, p2 if p2 is not None else p1, inv if inv is not None else p1,
        s, segment_dim, d, z1.stride(0), z1.stride(1), zb.stride(0), zb.stride(1),
        local_start, local_stop, 1.0 / temperature, eps,
        TWO_VIEWS=two, ROUND_BF16=round_bf16, USE_INT64=needs_int64(z1, zb, p1),
        ROUND_TF32=round_tf32, EMULATE_TF32=emulate_tensor_cores(), **meta,
    )
    return p1, p2, inv




def music_loss_backward(
    z1: Tensor, z2: Tensor, dp_off1: Tensor, dp_off2: Tensor, p_diag: Tensor,
    grad_terms: Tensor, segment_dim: int, temperature: float, eps: float, c_diag: float,
    inv_coef: float, local_rows: tuple[int, int], has_off: bool,
    diag_segments: tuple[int, int] | None = None,
    out: tuple[Tensor | None, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch :func:`music_loss_bwd_kernel`; returns ``(dz1, dz2)`` in the views' dtypes.

    ``local_rows``: the batch rows whose invariance term counts. ``diag_segments``: only
    the diagonal entries of these segments ``[s0, s1)`` count (sharding): the kernel is
    launched on the column ranges before, inside and after them (pointers offset to the
    range's first column), with ``c_diag = 0`` outside. ``out``: write ``(dz1, dz2)`` into
    these contiguous ``(N, D)`` arrays (they may be ``dp_off1, dp_off2`` themselves: the
    gradients finished in place); ``None`` in a slot: that view's gradient is not formed
    (an empty tensor is returned for it).

    Example:
        >>> import os, torch
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     z = torch.randn(4, 6)
        ...     dz1, dz2 = music_loss_backward(z, z.clone(), z.new_empty(0), z.new_empty(0),
        ...                                    z.new_ones(6), torch.tensor([1.0, 0, 0, 0]),
        ...                                    3, 1.0, 0.0, 0.5, -0.1, (0, 4), False)
        ...     assert dz1.shape == dz2.shape == (4, 6)
    """
    n, d = z1.shape
    s = d // segment_dim
    s0, s1 = diag_segments if diag_segments is not None else (0, s)
    if out is None:
        out = (torch.empty((n, d), device=z1.device, dtype=z1.dtype),
               torch.empty((n, d), device=z2.device, dtype=z2.dtype))
    dz1, dz2 = out
    need1, need2 = dz1 is not None, dz2 is not None
    if not (need1 or need2):
        raise ValueError("out must name at least one gradient to form")
    for t in (dz1, dz2):
        if t is not None and (t.shape != (n, d) or not t.is_contiguous()):
            raise ValueError(f"out arrays must be contiguous ({n}, {d}), got {tuple(t.shape)}")
    # A view that needs no gradient (or has no off-block product) reads and writes through
    # the other view's pointers: the kernel's NEED flags keep it from touching them.
    some = dz1 if dz1 is not None else dz2
    assert some is not None
    off1 = dp_off1 if dp_off1.numel() else (dp_off2 if has_off else p_diag)
    off2 = dp_off2 if dp_off2.numel() else (dp_off1 if has_off else p_diag)
    use_int64 = needs_int64(z1, z2, some)
    for first, stop, coef in ((0, s0, 0.0), (s0, s1, c_diag), (s1, s, 0.0)):
        if stop <= first:
            continue
        c = first * segment_dim  # D stays the row stride of dpo and dz

        def cols(t: Tensor, c: int = c) -> Tensor:
            return t[:, c:] if t.dim() == 2 else t[c:]

        meta = softmax_blocks(segment_dim, stop - first)
        grid = (n, triton.cdiv(stop - first, meta["BLOCK_S"]))
        music_loss_bwd_kernel[grid](
            cols(z1), cols(z2), cols(off1), cols(off2), cols(p_diag), grad_terms,
            cols(dz1 if dz1 is not None else some), cols(dz2 if dz2 is not None else some),
            stop - first, segment_dim, d, z1.stride(0), z1.stride(1),
            z2.stride(0), z2.stride(1), local_rows[0], local_rows[1], 1.0 / temperature, eps,
            coef, inv_coef, 1.0 / n, HAS_OFF=has_off, USE_INT64=use_int64, NEED1=need1,
            NEED2=need2, **meta,
        )
    empty = torch.empty(0, device=z1.device, dtype=torch.float32)
    return (dz1 if dz1 is not None else empty), (dz2 if dz2 is not None else empty)
