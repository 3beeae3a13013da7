"""The results of a sweep: one CSV per study, ``OUTPUT/<study>.csv``, one row per finished run.

Columns: ``study, setting, seed``; the COCO metrics ``AP, AP50, AP75, APs, APm, APl`` as
COCOeval gives them (fractions in [0, 1]; -1 where an area range has no ground truth);
``score_iou_r`` (Pearson correlation of detection score and IoU, see
:mod:`detector.metrics`); ``train_seconds`` (wall time of the training, summed over the
attempts of a resumed run); ``commit, device, torch``; then ``eval_seconds, epochs, iterations,
img_size, dataset, budget, budget_id, run_key, finished_at``.

Files are rewritten whole through a temporary file and ``os.replace``, so a killed sweep
leaves either the old or the new file, never half a row.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["FIELDS", "read_rows", "write_rows", "upsert_rows", "find_row_by_key"]

FIELDS: tuple[str, ...] = (
    "study",
    "setting",
    "seed",
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "score_iou_r",
    "train_seconds",
    "commit",
    "device",
    "torch",
    "eval_seconds",
    "epochs",
    "iterations",
    "img_size",
    "dataset",
    "budget",
    "budget_id",
    "run_key",
    "finished_at",
)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a results CSV as dicts of strings ([] if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: str | os.PathLike, rows: Iterable[dict[str, object]]) -> None:
    """Atomically replace ``path`` with ``rows`` (columns :data:`FIELDS`, extra keys ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def upsert_rows(path: str | os.PathLike, new: Iterable[dict[str, object]]) -> None:
    """Add ``new`` rows, replacing any row with the same (setting, seed, budget_id)."""
    new = list(new)
    ids = {(str(r["setting"]), str(r["seed"]), str(r["budget_id"])) for r in new}
    kept = [r for r in read_rows(path) if (r["setting"], r["seed"], r["budget_id"]) not in ids]
    write_rows(path, [*kept, *new])


def find_row_by_key(out_dir: str | os.PathLike, key: str) -> dict[str, str] | None:
    """A row of any study's CSV in ``out_dir`` whose run_key is ``key`` (a shared run)."""
    for path in sorted(Path(out_dir).glob("*.csv")):
        for r in read_rows(path):
            if r.get("run_key") == key:
                return r
    return None
