"""Memory of the torch backend, measured deterministically: bytes saved for backward."""

from __future__ import annotations

import pytest
import torch

from music_loss import music_loss


def saved_bytes(backend: str, n: int, d: int, k: int) -> int:
    """Bytes of every tensor autograd saves for backward (counted once per storage)."""
    z1 = torch.randn(n, d, requires_grad=True)
    z2 = torch.randn(n, d, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        music_loss(z1, z2, k, backend=backend).backward()
    return sum(storages.values())


def test_torch_backend_saves_order_n_d_never_d_squared():
    n, d, k = 64, 4096, 64
    one_joint_matrix = 4 * d * d  # one fp32 D x D matrix: 64 MiB
    fast = saved_bytes("torch", n, d, k)
    reference = saved_bytes("reference", n, d, k)
    print(f"\nsaved for backward at N={n}, D={d}: torch {fast / 2**20:.2f} MiB, "
          f"reference {reference / 2**20:.1f} MiB, one D x D fp32 {one_joint_matrix / 2**20:.0f} MiB")
    assert fast <= 2 * 4 * n * d  # dz1 and dz2, nothing else
    assert fast * 16 <= one_joint_matrix
    assert reference >= one_joint_matrix  # the measurement sees D x D tensors when they exist


@pytest.mark.parametrize("n,d", [(512, 8160), (2048, 8160), (256, 16320), (2048, 2000)])
def test_default_chunk_stays_within_the_order_n_d_arrays(n, d):
    from music_loss.torch_backend import default_chunk_size

    chunk = default_chunk_size(n, d)
    assert 1 <= chunk <= d
    # three chunk x D buffers: at most 32 MiB each, and no more than the four N x D arrays
    # (probabilities and gradients) the backend holds anyway, or 12 Mi elements
    assert chunk * d <= 1 << 23
    assert 3 * chunk * d <= max(4 * n * d, 3 << 20)
    if (n, d) == (512, 8160):  # the CPU benchmark shape: well under one D x D matrix
        assert 3 * chunk * d * 8 <= d * d
