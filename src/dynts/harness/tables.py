"""Every table the package prints or writes, rendered by one rule: aligned text for a terminal, or Markdown.

The first `left` columns (the names: dataset, run, policy) are left-aligned and the figures right-aligned; a
rule of dashes separates the header from the rows. Callers format their cells; this module only lays them out,
so a report, a comparison, a fidelity table and a training summary look alike.
"""

from __future__ import annotations

from collections.abc import Sequence


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, markdown: bool = False) -> str:
    """headers and rows of already formatted cells as one table (see the module docstring)."""
    headers = [str(h) for h in headers]
    rows = [[str(c) for c in row] for row in rows]
    if any(len(row) != len(headers) for row in rows):
        raise ValueError("every row of a table needs one cell per header")
    if markdown:
        lines = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|",
        ]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def fixed(value: float | None, digits: int) -> str:
    """A figure with `digits` decimals, or '-' when it is missing."""
    return "-" if value is None else f"{value:.{digits}f}"


__all__ = ["fixed", "render_table"]
