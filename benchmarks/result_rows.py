"""The microbenchmark rows of the result CSVs: read them, keep the newest row of each case.

Also the row accessors that the plots, the targets and the summary's tables share: a numeric
column (``_f``), the order of the providers and sizes, the operators' titles.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from benchmarks import csvio

_OP_TITLES = {
    "qfl": "Quality Focal Loss",
    "dfl": "Distribution Focal Loss",
    "integral": "Softmax integral",
}
_PEER_ORDER = ("eager", "compile", "mmdet", "ultralytics")


def _f(row: dict, key: str) -> float:
    """A numeric column, NaN when empty or missing."""
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan


def _provider_rank(name: str) -> tuple[int, str]:
    return (_PEER_ORDER.index(name), name) if name in _PEER_ORDER else (len(_PEER_ORDER), name)


def _size_key(size: str) -> tuple[int, int]:
    r, c = size.split("x")
    return int(r), int(c)


def load_rows(results_dir: Path) -> list[dict[str, str]]:
    """Every microbenchmark row of the CSVs directly in ``results_dir``."""
    rows: list[dict[str, str]] = []
    for path in sorted(results_dir.glob("*.csv")):
        data = csvio.read_rows(path)
        if data and "provider" in data[0] and "op" in data[0]:
            rows.extend(data)
    return rows


def latest(rows: Iterable[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """device name -> the newest row of each case (quick rows only if nothing else exists)."""
    by_device: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_device[row["device_name"]].append(row)
    result: dict[str, list[dict[str, str]]] = {}
    for device, drows in by_device.items():
        if any(r["preset"] != "quick" for r in drows):
            drows = [r for r in drows if r["preset"] != "quick"]
        newest: dict[tuple, dict[str, str]] = {}
        for r in drows:
            key = (r["op"], r["provider"], r["mode"], r["dtype"], r["size"])
            if key not in newest or r["run_id"] >= newest[key]["run_id"]:
                newest[key] = r
        result[device] = sorted(
            newest.values(),
            key=lambda r: (
                r["op"],
                r["mode"],
                r["dtype"],
                _size_key(r["size"]),
                _provider_rank(r["provider"]),
            ),
        )
    return result
