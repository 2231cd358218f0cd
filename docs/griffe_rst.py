"""griffe extension for the API pages: read the docstrings' reStructuredText habits as Markdown.

The docstrings are Google style with a few Sphinx habits that Markdown would print
literally; this rewrites them when mkdocstrings loads the package (the sources stay as
they are):

* ``Example:`` (singular, as Napoleon accepts) -> ``Examples:``, so ``>>>`` blocks become
  highlighted code instead of nested block quotes;
* ``:func:`name``` and the other Sphinx roles -> ``name`` as code;
* a line ending in ``::`` (which introduces a literal block) -> ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = re.sub(r"^([ \t]*)Example:[ \t]*$", r"\1Examples:", obj.docstring.value, flags=re.M)
        text = _ROLE.sub(r"`\1`", text)
        text = re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)
        obj.docstring.value = text
