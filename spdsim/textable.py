"""Plain-text tables for the terminal: one formatter for every command that prints one."""
from __future__ import annotations

import math
from typing import Any, Sequence


def cell(value: Any, spec: str) -> str:
    """`format(value, spec)`, or an empty cell for a missing value (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def align(rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,)) -> str:
    """Columns padded to their widest cell (the columns in `left` left-aligned, the rest right-aligned),
    a rule under the first (header) row."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
