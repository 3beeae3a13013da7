"""Markdown of ``summary.md``: the number formats of a table cell, and the pipe table itself."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _ms(v: float) -> str:
    return "-" if v != v else f"{v:.4g}"


def _x(v: float) -> str:
    return "-" if v != v else f"{v:.2f}x"


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}%"


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines
