"""The built wheel holds the library and nothing else.

``kernels/`` ships as ``music_loss.kernels`` (a package-dir mapping); the tooling around the
library (the AOT checker, the profiler, the launch-plan arithmetic in ``benchmarks/``) and a
top-level ``kernels`` package must not. The wheel is built from a copy of the checkout, so a
stale ``build/`` directory cannot hide or add files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Modules that belong to ``benchmarks/``, never to the installed package.
TOOLING = ("aot", "profile", "plan")
#: Left out of the copy: environments, caches and earlier build outputs.
_IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "site", "*.egg-info",
                                 "__pycache__", ".lint-site", "runs", ".hypothesis",
                                 ".*_cache", "data")


def wheel_problems(names: list[str]) -> list[str]:
    """What is wrong with a wheel holding the files ``names`` (empty: nothing).

    Example:
        >>> wheel_problems(["music_loss/py.typed", "kernels/aot.py"])[0]
        'top-level kernels/ package: kernels/aot.py'
    """
    problems = [f"top-level kernels/ package: {n}" for n in names if n.startswith("kernels/")]
    problems += [f"tooling in the wheel: {n}" for n in names
                 if n.endswith(".py") and Path(n).stem in TOOLING]
    problems += [f"not library code: {n}" for n in names
                 if not n.startswith(("music_loss/", "music_loss-"))]
    if "music_loss/py.typed" not in names:
        problems.append("music_loss/py.typed missing")
    shipped = {Path(n).name for n in names if n.startswith("music_loss/kernels/")}
    source = {p.name for p in (ROOT / "kernels").glob("*.py")}
    if not source or shipped != source:
        problems.append(f"music_loss/kernels/ holds {sorted(shipped)}, kernels/ has "
                        f"{sorted(source)}")
    return problems


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "--wheel-dir", str(tmp / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("music_loss-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_wheel_holds_the_library_only(wheel_names: list[str]) -> None:
    assert wheel_problems(wheel_names) == [], wheel_names
    assert "music_loss/kernels/triton_backend.py" in wheel_names


def test_the_check_sees_tooling_and_a_missing_kernel() -> None:
    good = ["music_loss/__init__.py", "music_loss/py.typed",
            *(f"music_loss/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py"))]
    assert wheel_problems(good) == []
    assert wheel_problems([*good, "music_loss/kernels/aot.py"])
    assert wheel_problems([*good, "benchmarks/plan.py"])
    assert wheel_problems([n for n in good if not n.endswith("launchers.py")])
    assert wheel_problems([n for n in good if n != "music_loss/py.typed"])


def test_the_library_does_not_import_the_tooling() -> None:
    """``benchmarks`` is not installed: an import of it from the package would fail for users."""
    import ast

    offenders = []
    for path in [*(ROOT / "music_loss").glob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] in ("benchmarks", "tests", "examples")]
    assert offenders == []
