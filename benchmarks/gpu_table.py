"""The docs' "Which path runs on my GPU" table, generated from ``music_loss.check --plan-for``.

Usage::

    python -m benchmarks.gpu_table           # print the table
    python -m benchmarks.gpu_table --write   # rewrite it in docs/gpus.md (between markers)

A test keeps the committed table equal to this output.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from music_loss import _gpu_policy
from music_loss.check import KINDS, choices_for, plan_for, summarize

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gpus.md"
START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"


def _cell(choice: dict[str, str]) -> str:
    return f"{'Triton' if choice['backend'] == 'triton' else 'torch'} · {choice['precision']}"


def table() -> str:
    """The markdown table: one row per card generation, one column per kind of input."""
    header = ["Compute capability", "Cards", "Shared memory per block", *KINDS]
    rows = [header, ["---"] * len(header)]
    for (major, minor), cards in _gpu_policy.CARDS.items():
        picks = summarize(plan_for(f"{major}.{minor}")["choices"])
        smem = _gpu_policy.SMEM_PER_BLOCK_KIB[(major, minor)]
        rows.append([f"sm_{major}{minor} ({major}.{minor})", cards, f"{smem} KiB",
                     *(_cell(picks[kind]) for kind in KINDS)])
    rocm = summarize(choices_for(_gpu_policy.Card("ROCm", (0, 0), 0, rocm=True)))
    rows.append(["ROCm", "AMD Instinct, Radeon", "", *(_cell(rocm[kind]) for kind in KINDS)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def reasons() -> str:
    """Each distinct reason behind the table's cells, once, with the cards it applies to."""
    cards: dict[str, list[str]] = {}
    for major, minor in _gpu_policy.CARDS:
        for pick in summarize(plan_for(f"{major}.{minor}")["choices"]).values():
            line = f"{_cell(pick)}: {pick['reason']}"
            if f"sm_{major}{minor}" not in cards.setdefault(line, []):
                cards[line].append(f"sm_{major}{minor}")
    return "".join(f"- {line} ({', '.join(sms)})\n" for line, sms in cards.items())


def generated() -> str:
    """What goes between the page's markers."""
    return f"{START}\n{table()}\nWhy, cell by cell:\n\n{reasons()}{END}"


def committed(page: pathlib.Path = PAGE) -> str:
    """The table as committed in the page (markers included)."""
    text = page.read_text()
    return text[text.index(START):text.index(END) + len(END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the table in {PAGE}")
    args = parser.parse_args(argv)
    if not args.write:
        print(generated())
        return 0
    text = PAGE.read_text()
    PAGE.write_text(text.replace(committed(PAGE), generated()))
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
