"""mkdocs hooks: committed plots and MathJax served by the site itself, includes, and a check
of the troubleshooting page.

* A page line ``<!-- include: PATH -->`` (PATH from the repository root) is replaced by that
  file, nested under the heading above the line (none: as it is), so the ImageNet README and
  ``CHANGELOG.md`` appear in the site without a copy in ``docs/``. A missing file fails the
  build.
* ``benchmarks/results/*.png`` appear as ``benchmarks/<name>.png``, beside the benchmarks
  page, so the committed plots are shown as they are (no copies in ``docs/``).
* MathJax's ``tex-svg.js`` (one self-contained file: SVG output needs no web fonts) comes
  from the ``django-static-mathjax`` wheel of the ``docs`` extra, so formulas render
  offline.
* The troubleshooting page quotes the library's error messages, one per line in the form
  ``> `ValueError: message` `` (… stands for a value). Each quote must match a message in
  ``music_loss/`` or ``kernels/``, with that exception type when one is named, or the build
  fails: a reworded message cannot leave a stale quote behind.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.troubleshooting")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SOURCES = (ROOT / "music_loss", ROOT / "kernels")
TROUBLESHOOTING = "troubleshooting.md"
QUOTE = re.compile(r"^> `(?:(\w+(?:Error|Exception)): )?(.+)`$", re.MULTILINE)
HOLE, ANY = "\x00", "…"  # a value in a message template; a value in a quote


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


def _template(node: ast.expr) -> str | None:
    """A string literal or f-string as text, each formatted value as ``HOLE``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str)
                       else HOLE for v in node.values)
    return None


@functools.cache
def _messages() -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(exception name, template) of every ``raise X("...")``, and every string in the code.

    The second set holds messages assembled before the raise (the reasons the Triton
    backend cannot run are returned by a function, then raised with a prefix).
    """
    raised, strings = set(), set()
    for path in sorted(p for src in SOURCES for p in src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Constant, ast.JoinedStr)):
                text = _template(node)
                if text and " " in text:
                    strings.add(text)
            if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                    and node.exc.args):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                text = _template(node.exc.args[0])
                if text:
                    raised.add((name, text))
    return tuple(sorted(raised)), tuple(sorted(strings))


def _matches(quote: str, template: str) -> bool:
    """Whether the quote can be the template: ``…`` and ``HOLE`` each stand for any text.

    A value written out in the quote (``z1``, ``backend``) fills a hole; ``…`` covers one or
    more holes and the spaces and punctuation between them (``{type} {value}``), never a word
    of the message.
    """
    q, t = quote, template

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(q) and j == len(t):
            return True
        if i < len(q) and q[i] == ANY and j < len(t) and (t[j] == HOLE or t[j] in " ,'\"") \
                and (match(i + 1, j + 1) or match(i, j + 1)):
            return True
        if j < len(t) and t[j] == HOLE and i < len(q) and q[i] != ANY \
                and (match(i + 1, j + 1) or match(i + 1, j)):
            return True
        return i < len(q) and j < len(t) and q[i] == t[j] and q[i] not in (ANY, HOLE) \
            and match(i + 1, j + 1)

    return match(0, 0)


def _check_quotes(markdown: str) -> None:
    raised, strings = _messages()
    unknown = []
    for match in QUOTE.finditer(markdown):
        kind, quote = match.group(1), match.group(2)
        words = {quote[k:k + 10] for k in range(0, max(1, len(quote) - 9))
                 if ANY not in quote[k:k + 10]}
        candidates = ([t for name, t in raised if name == kind] if kind else list(strings))
        if not any(any(w in t for w in words) and _matches(quote, t) for t in candidates):
            unknown.append(f"{kind + ': ' if kind else ''}{quote}")
    if unknown:
        raise ValueError(f"{TROUBLESHOOTING} quotes messages the code does not raise:\n  "
                         + "\n  ".join(unknown))
    quoted = [m.group(2) for m in QUOTE.finditer(markdown)]
    missing = [f"{name}: {t.replace(HOLE, ANY)}" for name, t in raised
               if name in ("ValueError", "TypeError") and not any(_matches(q, t) for q in quoted)]
    if missing:
        log.info("%s does not quote %d messages (internal ones are fine):\n  %s",
                 TROUBLESHOOTING, len(missing), "\n  ".join(missing))


def on_page_markdown(markdown: str, page: Page, **_: object) -> str:
    """Replace each include line by its file, nested under the heading above the line."""
    if page.file.src_uri == TROUBLESHOOTING:
        _check_quotes(markdown)

    def include(match: re.Match[str]) -> str:
        path = ROOT / match.group(1)
        if not path.is_file():
            raise FileNotFoundError(f"docs include: {match.group(1)} does not exist")
        above = re.findall(r"^(#{1,6}) ", markdown[: match.start()], flags=re.MULTILINE)
        return _demote_headings(path.read_text(), len(above[-1]) if above else 0)

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
