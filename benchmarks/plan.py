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
from music_loss.kernels.segment_softmax import softmax_blocks


def workspace_bytes(dim: int, precision: str, chunk_size: int | None = None,
                    n: int | None = None) -> int:
    """The joint pass's workspace in bytes, beyond the ``O(N D)`` arrays (``chunk_size``
    default: :func:`chunk_size_for` for a batch of ``n``): the ``G`` chunk, the per-tile
    partial sums (one buffer reused by every chunk) and ``diag(P)``.

    Example:
        >>> workspace_bytes(8160, "tf32", n=2048) <= 2048 * 8160 * 4 + 2**20
        True
    """
    rows = min(chunk_size or chunk_size_for(dim, precision, n), dim)
    g_chunk = rows * dim * operand_dtype(precision).itemsize
    partials = 2 * 4 * triton.cdiv(rows, MIN_TILE) * triton.cdiv(dim, MIN_TILE)
    return g_chunk + partials + 4 * dim


def _invariance_partials_bytes(n: int, dim: int, segment_dim: int) -> int:
    """The softmax kernel's invariance partial sums (fp32), per row and block of segments."""
    segments = dim // segment_dim
    return 4 * n * triton.cdiv(segments, softmax_blocks(segment_dim, segments)["BLOCK_S"])


def fused_memory_bytes(n: int, dim: int, precision: str, need_grad: bool = True,
                       chunk_size: int | None = None, segment_dim: int = 80) -> dict[str, int]:
    """Bytes the fused path allocates beyond the inputs (fp32 here) and their gradients, by
    buffer: the arrays the launchers allocate.

    Forward: ``p2`` (operand dtype) and ``p1`` (with fp32 operands and a gradient, ``p1``
    lives in the first view's gradient array: 0 here), the invariance partial sums, and the
    bounded workspace (:func:`workspace_bytes`: the ``G`` chunk, partial sums, ``diag(P)``).
    Every product reads these ``(N, D)`` arrays and ``G`` as stored, in every mode: tf32's
    operands are transposed on chip where the tensor cores need them K-major, not copied.
    The two fp32 ``(N, D)`` arrays the gradients accumulate in are the inputs' gradients.
    Backward: the loss's upstream gradient times those saved arrays forms the gradients, so
    the saved arrays are extra while the new gradients exist (``backward``). ``peak``: the
    larger phase. Nothing is ``D x D``.

    Example:
        >>> plan = fused_memory_bytes(2048, 8160, "tf32")  # p1 in the gradient array
        >>> plan["p1"], plan["peak"] == plan["forward"], plan["backward"] == 2 * 2048 * 8160 * 4
        (0, True, True)
        >>> round(plan["peak"] / 1e6, 1)  # MB at the paper's shape
        134.3
    """
    check_precision(precision)
    op = operand_dtype(precision).itemsize
    p1 = 0 if need_grad and op == 4 else n * dim * op
    p2 = n * dim * op
    inv = _invariance_partials_bytes(n, dim, segment_dim)
    rows = min(chunk_size or chunk_size_for(dim, precision, n), dim)
    workspace = workspace_bytes(dim, precision, rows)
    if not need_grad:  # no G chunk without gradients
        workspace -= rows * dim * op
    forward = p1 + p2 + inv + workspace
    backward = 2 * n * dim * 4 if need_grad else 0
    return {"p1": p1, "p2": p2, "invariance_partials": inv, "workspace": workspace,
            "forward": forward, "saved_gradients": backward, "backward": backward,
            "peak": max(forward, backward)}


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
        1.67
    """
    rows = chunk_size or chunk_size_for(dim, precision, n)
    op = operand_dtype(precision).itemsize
    total = 0
    for a0 in range(0, dim, rows):
        r = min(rows, dim - a0)
        total += r * dim * op                                   # G written
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
