"""The fused path's launch plan as numbers: workspace and peak bytes, launches per step,
compulsory gradient-phase traffic, and the share of joint tiles on the block diagonal.

Arithmetic from the launcher's rules (:func:`music_loss.kernels.configs.chunk_size_for`,
:class:`music_loss.kernels.launchers.JointPlan`), not measurements: the tests hold the
launcher to it (``tests/kernels/test_plan.py``), and the benchmarks quote it next to the
measured numbers.
"""

from __future__ import annotations

import triton

from music_loss.kernels._common import check_precision, operand_dtype
from music_loss.kernels.configs import MIN_TILE, chunk_size_for


def workspace_bytes(dim: int, precision: str, chunk_size: int | None = None,
                    n: int | None = None) -> int:
    """Upper bound of the joint pass's workspace in bytes, beyond the ``O(N D)`` arrays
    (``chunk_size`` default: :func:`chunk_size_for` for a batch of ``n``): the ``G`` chunk
    (tf32: and ``G^T``), the per-tile partial sums and ``diag(P)``.

    Example:
        >>> workspace_bytes(8160, "tf32", n=2048) <= 2 * (2048 * 8160 * 4) + 2**20
        True
    """
    rows = min(chunk_size or chunk_size_for(dim, precision, n), dim)
    # tf32: G^T too (dp2's K-major operand), as large as the G chunk.
    g_chunk = rows * dim * operand_dtype(precision).itemsize * (2 if precision == "tf32" else 1)
    partials = 2 * 4 * triton.cdiv(rows, MIN_TILE) * triton.cdiv(dim, MIN_TILE)
    return g_chunk + partials + 4 * dim


def fused_memory_bytes(n: int, dim: int, precision: str, need_grad: bool = True,
                       chunk_size: int | None = None) -> dict[str, int]:
    """Bytes the fused path allocates beyond the inputs and their gradients, by buffer.

    ``p`` (operand dtype; in tf32 mode also its ``(D, N)`` transposes, the joint product's
    K-major operands) lives during the forward only; ``dp_off`` (fp32) is saved for the
    backward; the ``G`` chunk (tf32: and ``G^T``), partial sums and ``diag(P)`` are the
    bounded workspace (:func:`workspace_bytes`). Nothing is ``D x D``.

    Example:
        >>> plan = fused_memory_bytes(2048, 8160, "tf32")
        >>> plan["workspace"] < 4 * 8160**2 // 1.9, plan["p1_p2_transposed"], plan["peak"]
        (True, 133693440, 535328640)
    """
    check_precision(precision)
    p_bytes = 2 * n * dim * operand_dtype(precision).itemsize
    # tf32: the (D, N) transposes of p1, p2 (the joint product's K-major operands).
    p_transposed = p_bytes if precision == "tf32" else 0
    saved = 2 * n * dim * 4 if need_grad else 0
    rows = min(chunk_size or chunk_size_for(dim, precision, n), dim)
    workspace = workspace_bytes(dim, precision, rows)
    if not need_grad:  # no G chunk without gradients
        workspace -= rows * dim * operand_dtype(precision).itemsize * (
            2 if precision == "tf32" else 1)
    return {"p1_p2": p_bytes, "p1_p2_transposed": p_transposed, "saved_dp_off": saved,
            "workspace": workspace, "peak": p_bytes + p_transposed + saved + workspace}


def launches_per_step(dim: int, precision: str, chunk_size: int | None = None,
                      n: int | None = None) -> int:
    """Triton launches of one forward+backward of the fused loss (gradients needed): the
    softmax forward, per chunk of rows of ``P`` the joint kernel and the two gradient
    products, and the backward kernel (ATen's small ops, e.g. the partial sums, not counted).

    Example:
        >>> launches_per_step(8160, "tf32", n=2048)  # 4 chunks of 2048 rows
        14
    """
    rows = chunk_size or chunk_size_for(dim, precision, n)
    return 2 + 3 * triton.cdiv(dim, rows)


def gradient_phase_bytes(n: int, dim: int, precision: str, chunk_size: int | None = None) -> int:
    """Compulsory global-memory bytes of the gradient phase of one step: per chunk, the ``G``
    store, and each product reading its operands once and writing its output once (``dp2``
    read-modify-written from the second chunk on). Tile re-reads (served by L2 or not) are
    not counted: a lower bound of the traffic, from the launch plan, not a measurement.

    Example:
        >>> round(gradient_phase_bytes(2048, 8160, "tf32") / 1e9, 2)
        1.93
    """
    rows = chunk_size or chunk_size_for(dim, precision, n)
    op = operand_dtype(precision).itemsize
    total = 0
    for a0 in range(0, dim, rows):
        r = min(rows, dim - a0)
        total += r * dim * op * (2 if precision == "tf32" else 1)  # G (and G^T) written
        total += n * dim * op + r * dim * op + n * r * 4        # dp1[:, a0:a1] = p2 G^T / N
        total += n * r * op + r * dim * op + n * dim * 4 * (2 if a0 else 1)  # dp2 (+)= p1 G
    return total


def block_diagonal_tile_fraction(dim: int, segment_dim: int, block_a: int,
                                 block_b: int) -> float:
    """Fraction of the joint kernel's ``block_a x block_b`` tiles over a ``D x D`` pass whose
    segment ranges meet: they touch the block diagonal and run the general epilogue (segment
    masks, the diagonal sum, ``P``'s diagonal); the others take every valid entry as
    off-block (see :func:`music_loss.kernels.joint_entropy.joint_entropy_kernel`).

    Example:
        >>> round(block_diagonal_tile_fraction(8160, 80, 128, 128), 3)  # the paper's shape
        0.041
    """
    def meets(a: int, b: int) -> bool:
        return (a // segment_dim <= (b + block_b - 1) // segment_dim
                and b // segment_dim <= (a + block_a - 1) // segment_dim)

    tiles = [(a, b) for a in range(0, dim, block_a) for b in range(0, dim, block_b)]
    return sum(meets(a, b) for a, b in tiles) / len(tiles)
