"""Autotune configs of the joint kernel and the gradient products, the shared-memory model
that filters them per architecture and precision, and the chunk size of the joint pass.

A config fits a device when its pipelined operand tiles (``stages x (rows + columns) x
depth x element size``) plus :data:`EPILOGUE_SMEM` fit the device's per-block shared memory.
``python -m benchmarks.aot`` compiles every config this module offers for each architecture
the Triton kernels run on (sm_80 to sm_120) and checks registers, spills and shared memory
against the same limits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton

from music_loss._gpu_policy import SMEM_PER_BLOCK_KIB
from music_loss.kernels._common import INTERPRET, operand_dtype

#: Bytes of the ``G`` chunk workspace the launcher aims for (rounded to 128-row chunks).
WORKSPACE_BYTES = 32 * 2**20
#: Chunks hold a multiple of this many rows of ``P`` (the largest tile edge).
CHUNK_MULTIPLE = 128
#: Smallest tile edge of any config: sizes the partial-sum buffers.
MIN_TILE = 16

#: Per-block shared memory limits (opt-in, bytes) by architecture (``86`` for sm_86), from
#: the GPU policy's table: what the AOT check compiles against (163 KiB sm_80, 99 KiB
#: sm_86/89/120, 227 KiB sm_90/100). At run time the device's own limit is used.
SMEM_LIMITS: dict[int, int] = {major * 10 + minor: kib * 1024
                               for (major, minor), kib in SMEM_PER_BLOCK_KIB.items()}
#: Shared memory kept for the epilogue's scratch (layout conversions, reductions).
EPILOGUE_SMEM = 16 * 1024

#: Operand bytes on a GPU per precision mode (``operand_dtype`` is fp32 for emulated bf16).
OPERAND_BYTES: dict[str, int] = {"ieee": 4, "tf32": 4, "bf16": 2}


def _operand_smem(block_m: int, block_n: int, block_k: int, stages: int, itemsize: int) -> int:
    """Shared memory of the pipelined operand tiles with ``itemsize``-byte operands."""
    return (block_m + block_n) * block_k * itemsize * stages


def tile_of(config: triton.Config) -> tuple[int, int, int]:
    """``(rows, columns, depth)`` of a joint or product config's tile.

    Example:
        >>> tile_of(JOINT_CONFIGS[0])
        (64, 64, 32)
    """
    kw = config.kwargs
    if "BLOCK_A" in kw:
        return kw["BLOCK_A"], kw["BLOCK_B"], kw["BLOCK_N"]
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]


def config_smem(config: triton.Config, precision: str) -> int:
    """Operand staging of ``config`` in ``precision`` on a GPU (4-byte operands, 2 in bf16)."""
    return _operand_smem(*tile_of(config), config.num_stages, OPERAND_BYTES[precision])


#: The deepest staging any candidate may use: 2-byte operands on sm_90.
_MAX_STAGING = max(SMEM_LIMITS.values()) - EPILOGUE_SMEM

#: Autotune configs of the joint kernel (the union over architectures and precisions;
#: :func:`configs_for` picks those of one). Tiles of 32 fp32 accumulators per thread (64x64
#: with 4 warps, 128x64 and 64x128 with 8) and of 64 (64x128 with 4 warps: one warpgroup
#: issuing Hopper's m64n128 ``wgmma``; 128x128 with 8: two of them). The epilogue (masks, a
#: log, reductions, the G store) holds the accumulator plus same-shaped temporaries, which
#: 64 accumulators per thread still fit in registers and 128 would not (``python -m
#: benchmarks.aot`` fails on a spill in a loop, or on more than 64 bytes outside one). Each
#: tile goes deeper along the batch (``BLOCK_N`` 128, or 4 stages at 64) where the staging
#: fits; the wide tiles take the two shallower depths only (each config costs the first step
#: an autotuning run and a compile per key). The 32-per-thread tiles come first:
#: deterministic mode pins a mode's first config.
_JOINT_MAIN: list[triton.Config] = [
    triton.Config({"BLOCK_A": ba, "BLOCK_B": bb, "BLOCK_N": bn, "GROUP_A": 8},
                  num_warps=warps, num_stages=stages)
    for ba, bb, warps in ((64, 64, 4), (128, 64, 8), (64, 128, 8), (64, 128, 4), (128, 128, 8))
    for wide in (ba * bb > 32 * 32 * warps,)
    for bn, stages in ((32, 4), (64, 3)) + (() if wide else ((64, 4), (128, 3)))
    if _operand_smem(ba, bb, bn, stages, 2) <= _MAX_STAGING
]

#: Autotune configs of the gradient products: a plain epilogue, so up to 64 accumulators
#: per thread (128 spill); deeper K steps where they fit.
_MATMUL_MAIN: list[triton.Config] = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                  num_warps=warps, num_stages=stages)
    for bm, bn, warps in ((64, 64, 4), (64, 128, 4), (128, 128, 8))
    for bk, stages in ((32, 4), (64, 3), (64, 4), (128, 3))
    if _operand_smem(bm, bn, bk, stages, 2) <= _MAX_STAGING
    and (bm, bn, bk) != (64, 64, 32)  # too little work per K step to hide latency
]


def _shallower(config: triton.Config) -> triton.Config:
    """``config`` with one pipeline stage fewer (a fallback of :data:`SHALLOW_FALLBACKS`)."""
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps,
                         num_stages=config.num_stages - 1)


def _same(a: triton.Config, b: triton.Config) -> bool:
    return (a.kwargs, a.num_warps, a.num_stages) == (b.kwargs, b.num_warps, b.num_stages)


#: 3-stage copies of the 4-stage configs fp32 needs on the ~99 KiB cards (sm_86, sm_89,
#: sm_120), where no 4-stage fp32 config of the gradient products (nor an 8-warp one of the
#: joint kernel, the only ones ``ieee`` keeps) fits: 72 KiB of staging plus the epilogue's
#: 16 KiB. :func:`configs_for` offers a fallback only where its 4-stage original does not
#: fit, so the cards with more shared memory autotune over the same configs as without it.
SHALLOW_FALLBACKS: list[triton.Config] = [
    _shallower(c) for c in _JOINT_MAIN if tile_of(c) == (128, 64, 32) and c.num_stages == 4
] + [_shallower(c) for c in _MATMUL_MAIN if tile_of(c) == (64, 128, 32) and c.num_stages == 4]

#: Autotune configs of the joint kernel (the union over architectures and precisions;
#: :func:`configs_for` picks those of one): the main configs, then the fallbacks.
JOINT_CONFIGS: list[triton.Config] = _JOINT_MAIN + [
    c for c in SHALLOW_FALLBACKS if "BLOCK_A" in c.kwargs]
#: Autotune configs of the gradient products: the main configs, then the fallbacks.
MATMUL_CONFIGS: list[triton.Config] = _MATMUL_MAIN + [
    c for c in SHALLOW_FALLBACKS if "BLOCK_M" in c.kwargs]

#: Autotune configs of the warp-specialised joint kernel (``WARP_SPECIALIZE``: bf16 on sm_90,
#: opt-in). Hopper's warp specialiser splits a ``num_warps=4`` program into a producer warp
#: group and two consumer warp groups that each take 64 rows of the tile, so the tile has 128
#: rows (a 64-row tile would have both consumers compute all of it); 128x64 leaves each
#: consumer the 32 accumulators per thread of the 8-warp 128x64 config (128x128 spills under
#: triton 3.8).
WS_JOINT_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_A": 128, "BLOCK_B": 64, "BLOCK_N": bn, "GROUP_A": 8},
                  num_warps=4, num_stages=stages)
    for bn, stages in ((32, 4), (64, 3), (64, 4), (128, 3))
]

#: Configs used under the interpreter (and by tests that pin one): few, large programs.
INTERPRET_JOINT_META: dict[str, int] = {"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_N": 32,
                                        "GROUP_A": 4}
#: The warp-specialised joint kernel's config under the interpreter (128-row tiles).
INTERPRET_WS_JOINT_META: dict[str, int] = {"BLOCK_A": 128, "BLOCK_B": 64, "BLOCK_N": 32,
                                           "GROUP_A": 4}
INTERPRET_MATMUL_META: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32,
                                         "GROUP_M": 4}


@functools.cache
def _device_smem(index: int) -> int:
    props: Any = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


def device_smem_limit() -> int:
    """The current CUDA device's per-block (opt-in) shared memory; sm_80's without CUDA."""
    if torch.cuda.is_available() and not INTERPRET:  # what Triton checks launches against
        return _device_smem(torch.cuda.current_device())
    return SMEM_LIMITS[80]


def configs_for(configs: list[triton.Config], precision: str,
                smem_limit: int | None = None) -> list[triton.Config]:
    """The configs a precision mode autotunes over on a device with ``smem_limit`` bytes of
    shared memory per block (default: the current device's).

    The operand staging (real element size: 4 bytes, 2 in bf16) plus
    :data:`EPILOGUE_SMEM` must fit the limit; a config of :data:`SHALLOW_FALLBACKS` is
    offered only where its 4-stage original does not fit. ``ieee`` runs on FMA units, where the
    operand tiles are spread over registers: on sm_80 every config with a 64-deep K step,
    and the joint kernel with 4 warps, spills (``python -m benchmarks.aot`` shows it);
    those are dropped for it.

    Example:
        >>> len(configs_for(JOINT_CONFIGS, "bf16", SMEM_LIMITS[90])) > len(
        ...     configs_for(JOINT_CONFIGS, "tf32", SMEM_LIMITS[80]))
        True
    """
    limit = device_smem_limit() if smem_limit is None else smem_limit
    def fits(config: triton.Config) -> bool:
        return config_smem(config, precision) <= limit - EPILOGUE_SMEM

    fitting = [c for c in configs if fits(c) and not (
        any(_same(c, f) for f in SHALLOW_FALLBACKS)
        and fits(triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages + 1)))]
    if precision == "tf32" and limit >= SMEM_LIMITS[90]:
        # sm_90/sm_100 (227 KiB): tf32 operands that reduce over their rows are loaded as
        # 16-column tiles and made K-major on chip (``_kmajor_operand_tile`` in
        # ``joint_entropy``); a 16-byte copy needs 4 floats a thread, depth * 16 >= 128 *
        # num_warps (8 warps with a 32-deep step would copy 8 bytes).
        fitting = [c for c in fitting if tile_of(c)[2] * 16 >= 128 * c.num_warps]
    if precision != "ieee":
        return fitting
    return [c for c in fitting if tile_of(c)[2] == 32 and ("BLOCK_A" not in c.kwargs
                                                           or c.num_warps == 8)]


def prune_configs(configs: list[triton.Config], named_args: dict[str, Any],
                  **kwargs: Any) -> list[triton.Config]:
    """The autotuners' ``early_config_prune``: :func:`configs_for` of the launch's mode."""
    precision = kwargs.get("PRECISION", named_args.get("PRECISION", "tf32"))
    return configs_for(configs, precision) or list(configs)


def meta_of(config: triton.Config) -> dict[str, Any]:
    """A config as the fixed meta-parameters :func:`~music_loss.kernels._common.launch` takes.

    Example:
        >>> meta_of(MATMUL_CONFIGS[0])["num_warps"]
        4
    """
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def chunk_size_for(dim: int, precision: str, n: int | None = None,
                   workspace_bytes: int = WORKSPACE_BYTES) -> int:
    """Rows of ``P`` per chunk: a multiple of 128, the larger of two sizes (at most ``D``).

    * the rows whose ``G`` chunk fits ``workspace_bytes`` (32 MiB): a floor that keeps
      chunks few at small batches;
    * the batch ``n`` rounded up to 128 (:data:`CHUNK_MULTIPLE`): every chunk re-reads an
      ``(N, D)`` operand for ``dp1`` and read-modify-writes the fp32 ``dp2``, about
      ``12 N D`` bytes a chunk, ``(D / rows) 12 N D`` a step against the products'
      ``4 N D^2`` FLOPs: ``3 / rows`` bytes per FLOP. With ``rows >= N`` that is at most
      ``3 / N`` (plus ``G``'s own store and reads, ``D^2`` entries whatever the chunking:
      ``op / N`` with ``op`` = 4 bytes, 2 in bf16), so the gradient traffic per FLOP falls
      as the batch grows instead of growing as ``N D^3``; the ``G`` chunk stays no larger
      than one ``(N, D)`` operand array, ``O(N D)``.

    Example:
        >>> chunk_size_for(8160, "tf32"), chunk_size_for(8160, "tf32", n=2048)
        (1024, 2048)
    """
    bytes_per_row = dim * operand_dtype(precision).itemsize
    rows = max(CHUNK_MULTIPLE, workspace_bytes // bytes_per_row // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
    if n is not None:
        rows = max(rows, triton.cdiv(n, CHUNK_MULTIPLE) * CHUNK_MULTIPLE)
    return min(rows, triton.cdiv(dim, CHUNK_MULTIPLE) * CHUNK_MULTIPLE)
