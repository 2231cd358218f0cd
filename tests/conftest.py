"""Test-session set-up shared by every test module.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before
anything imports ``music_loss.kernels``: without a CUDA device the whole session runs the
kernels in Triton's CPU interpreter.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# CI has 2 shared cores: no deadlines, fewer examples; `dev` explores more.
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    import pytest

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
