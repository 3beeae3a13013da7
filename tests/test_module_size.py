"""Every Python module of the product stays small enough to read in one sitting.

The rule (issue #21): no Python file in ``gfl_ops/``, ``detector/`` or ``benchmarks/`` over
450 lines. It is checked here because nothing else notices a file growing past it: a
``ruff format`` of the tree once pushed four modules over without anyone touching their logic.
A module that needs more lines has more than one job; split it along that seam.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gfl_ops", "detector", "benchmarks")
MAX_LINES = 450


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_packages_have_modules() -> None:
    # guards the test below against passing on an empty glob
    assert len(_modules()) > 50


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_450_lines(package: str) -> None:
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if p.relative_to(ROOT).parts[0] == package
        and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): {too_long}"
