"""Write a study's page: ``OUT/<study>.md`` (tables) and ``OUT/<study>.png`` (plot) from the
rows of ``OUT/<study>.csv`` that belong to one budget."""

from __future__ import annotations

from pathlib import Path

from .plots import plot_study
from .report import render_markdown, summarize
from .results import read_rows
from .studies import Study

__all__ = ["write_report"]


def write_report(study: Study, out_dir: str | Path, budget_id: str | None = None) -> Path:
    """Render ``study`` from its CSV; ``budget_id`` selects the rows (None: the budget of the
    last row written). Returns the markdown path."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir / f"{study.name}.csv")
    if budget_id is None and rows:
        budget_id = rows[-1].get("budget_id")
    mine = [r for r in rows if r.get("budget_id") == budget_id]
    png = out_dir / f"{study.name}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    if mine:
        plot_study(study, summarize(study, mine), png)
    md = out_dir / f"{study.name}.md"
    text = render_markdown(
        study, mine, png.name if mine else None, f"{study.name}.csv", ignored=len(rows) - len(mine)
    )
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(md)
    return md
