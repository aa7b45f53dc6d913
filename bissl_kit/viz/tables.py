"""Tables shown in notebooks: Markdown, so that an executed copy reads well without a kernel."""

from __future__ import annotations


def markdown_table(rows: list[dict], columns: list[str], *, formats: dict[str, str] | None = None):
    """A list of records as a Markdown table (displayed in notebooks, readable in executed copies)."""
    from IPython.display import Markdown
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(format(v, formats[c]) if c in formats and isinstance(v, (int, float)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return Markdown("\n".join(lines))
