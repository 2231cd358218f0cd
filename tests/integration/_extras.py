"""Import a package of an optional extra: skip the module without it, except where required.

CI installs the ``integrations`` extra and sets ``MUSIC_LOSS_REQUIRE_INTEGRATIONS=1``, so a
missing package there fails the run instead of silently skipping the integration tests.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, extra: str = "integrations") -> ModuleType:
    if os.environ.get("MUSIC_LOSS_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(
        module, reason=f"{module} is not installed: pip install -e '.[{extra}]'")
