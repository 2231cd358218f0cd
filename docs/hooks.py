"""mkdocs hooks: committed results and MathJax served by the site itself, and includes.

* A page line ``<!-- include: PATH -->`` (PATH from the repository root) is replaced by that
  file, nested under the heading above the line, so the committed benchmark reports and the ImageNet
  README appear as they are, under the page's own title. A missing file fails the build.

* ``benchmarks/results/*.png`` appear as ``benchmarks/<name>.png``, beside the benchmarks
  page, so the committed plots are shown as they are (no copies in ``docs/``).
* MathJax's ``tex-svg.js`` (one self-contained file: SVG output needs no web fonts) comes
  from the ``django-static-mathjax`` wheel of the ``docs`` extra, so formulas render
  offline.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.MULTILINE)


def _demote_headings(text: str, by: int) -> str:
    """Move headings ``by`` levels down, outside fenced code (a shell comment is no heading)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,6} ", line):
            hashes = len(line) - len(line.lstrip("#"))
            line = "#" * min(6, hashes + by) + line[hashes:]
        lines.append(line)
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, **_: object) -> str:
    """Replace each include line by its file, nested under the heading above the line."""

    def include(match: re.Match[str]) -> str:
        path = ROOT / match.group(1)
        if not path.is_file():
            raise FileNotFoundError(f"docs include: {match.group(1)} does not exist")
        above = re.findall(r"^(#{1,6}) ", markdown[: match.start()], flags=re.MULTILINE)
        return _demote_headings(path.read_text(), len(above[-1]) if above else 1)

    return INCLUDE.sub(include, markdown)


def _mathjax_script() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MathJax is missing: pip install -e '.[docs]' "
                           "(django-static-mathjax ships its files)")
    script = Path(list(spec.submodule_search_locations)[0]) / "static/mathjax/es5/tex-svg.js"
    if not script.is_file():
        raise RuntimeError(f"MathJax's tex-svg.js is not where expected: {script}")
    return script


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{png.name}", abs_src_path=str(png)))
    files.append(File.generated(config, "assets/mathjax/tex-svg.js",
                                abs_src_path=str(_mathjax_script())))
    return files
