"""The one Markdown table formatter of the project's reports (benchmarks, model analysis, run comparisons)."""
from typing import Sequence

__all__ = ["format_table"]


def format_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """A Markdown table with columns padded to their widest cell."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
