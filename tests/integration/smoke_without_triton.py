"""Import music_loss and run it on the CPU where Triton is absent; exit 1 on any failure.

    python tests/integration/smoke_without_triton.py               # Triton really missing
    python tests/integration/smoke_without_triton.py --hide-triton # hide an installed one

Run by ``tests/integration/test_without_triton.py`` and by ``.ci/run`` in a throwaway venv
(a CPU torch, the built wheel installed with ``--no-deps``, no Triton).
"""

from __future__ import annotations

import importlib.abc
import os
import sys


class _HideTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by this check)")
        return None


def main() -> None:
    if "--hide-triton" in sys.argv:
        sys.meta_path.insert(0, _HideTriton())
    try:
        import triton  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    print(f"triton importable: {importable}")
    if importable:
        sys.exit("triton imports here: this check needs a machine (or --hide-triton) without it")

    import torch

    import music_loss
    from music_loss import MUSICLoss
    from music_loss._dispatch import resolve_backend

    torch.manual_seed(0)
    z1 = torch.randn(32, 64, requires_grad=True)
    z2 = (z1.detach() + 0.1 * torch.randn(32, 64)).requires_grad_()
    picked = resolve_backend("auto", z1.device.type, z1.dtype)
    print(f"music_loss {music_loss.__version__}, torch {torch.__version__}; "
          f"backend auto -> {picked}")
    if picked != "torch":
        sys.exit(f"backend='auto' picked {picked!r} without Triton")
    loss = MUSICLoss(segment_dim=16)(z1, z2)
    loss.backward()
    want = MUSICLoss(segment_dim=16, backend="reference")(z1.double(), z2.double())
    error = abs(loss.item() - want.item()) / abs(want.item())
    print(f"loss {loss.item():.6f} (reference in float64 {want.item():.6f}, rel. error "
          f"{error:.1e}); gradient finite: {bool(torch.isfinite(z1.grad).all())}")
    if not (error < 1e-5 and torch.isfinite(z1.grad).all()):
        sys.exit("the CPU loss is wrong without Triton")
    try:
        MUSICLoss(segment_dim=16, backend="triton")(z1, z2)
    except ValueError as err:
        print(f"backend='triton' -> ValueError: {err}")
    else:
        sys.exit("backend='triton' ran without Triton")
    os.environ["TRITON_INTERPRET"] = "1"  # past the device check: now Triton itself is missing
    try:
        MUSICLoss(segment_dim=16, backend="triton")(z1, z2)
    except ValueError as err:
        print(f"backend='triton', TRITON_INTERPRET=1 -> ValueError: {err}")
        if "Triton does not import" not in str(err):
            sys.exit("the error does not say that Triton is missing")
    else:
        sys.exit("backend='triton' ran without Triton")


if __name__ == "__main__":
    main()
