"""Markdown tables for reports (``sasha pipeline``'s results table, ``study.md``).

One writer, so that every table the package prints has the same shape::

    Caption.

    | column | column |
    |---|---|
    | cell | cell |

Tables of one report are joined by a blank line (``"\\n\\n".join(tables)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["cap_label", "markdown_table"]


def markdown_table(
    columns: Sequence[str], rows: Iterable[Sequence[str]], caption: str | None = None
) -> str:
    """A Markdown table, under its caption when there is one (a blank line between them).

    Args:
        columns: the header cells.
        rows: the body, one sequence of already formatted cells per row (as many as
            ``columns``; an empty string leaves a cell blank).
        caption: a line of text above the table.

    Returns:
        The table's lines joined by newlines, without a trailing newline.
    """
    lines = [] if caption is None else [caption, ""]
    lines.append(_line(columns))
    lines.append("|" + "---|" * len(columns))
    lines += [_line(row) for row in rows]
    return "\n".join(lines)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def cap_label(frac: float, max_frac: float | None, spec: str = ".2f") -> str:
    """An adaptive row's cap in tables and legends: the agent's budget ``0.20``, or
    ``0.15 of 0.20`` when the stop rule's own cap (``max_frac``; over seeds, their mean) is
    lower, with a digit more where it would print as the budget (``0.198 of 0.20``)."""
    budget = f"{frac:{spec}}"
    if max_frac is None or max_frac >= frac:
        return budget
    cap = f"{max_frac:{spec}}"
    if cap == budget:
        cap = f"{max_frac:.3f}".rstrip("0")
    return f"{cap} of {budget}"
