"""What a run logs: console and ``train.log`` messages, the ``train_log.csv`` / ``eval_log.csv``
rows, TensorBoard scalars, and the ETA shown in the progress bar."""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..metrics import format_metrics_table

__all__ = ["setup_logging", "CSVLog", "read_csv", "format_eta", "RunLogs", "EVAL_LOG_FIELDS"]

logger = logging.getLogger("detector")

EVAL_LOG_FIELDS: tuple[str, ...] = (
    "epoch",
    "global_step",
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "score_iou_pearson",
)


def setup_logging(
    output_dir: str | os.PathLike | None, rank: int = 0, filename: str = "train.log"
) -> None:
    """INFO to stderr on rank 0 (WARNING elsewhere) and, on rank 0, to ``output_dir/filename``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_detector_handler", False):
            root.removeHandler(h)
            h.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    sh.setLevel(level)
    sh._detector_handler = True  # type: ignore[attr-defined]
    root.addHandler(sh)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / filename)
        fh.setFormatter(fmt)
        fh.setLevel(logging.INFO)
        fh._detector_handler = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    root.setLevel(logging.INFO)


class CSVLog:
    """Append-only CSV with a fixed header; on resume from a checkpoint taken after
    ``resume_step`` iterations, rows of later steps (written by the interrupted run after its
    last checkpoint) are dropped so the log has no duplicates."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: int | None) -> None:
        self.path = path
        self.fields = list(fields)
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["global_step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV log as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour; ``?`` when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class RunLogs:
    """The main process's logs of a run in ``output_dir``: ``train_log.csv`` (a row per logged
    iteration: ``loss_names``, lr, times), ``eval_log.csv`` (a row per evaluation) and, with
    ``tensorboard``, TensorBoard scalars in ``tb/``. ``resume_step``: the global step of the
    checkpoint a resumed run starts from (later rows and events are dropped), None for a new run.
    """

    def __init__(
        self,
        output_dir: Path,
        loss_names: Sequence[str],
        resume_step: int | None,
        tensorboard: bool,
    ) -> None:
        self.train_csv = CSVLog(
            output_dir / "train_log.csv",
            ["epoch", "iter", "global_step", "lr", *loss_names, "time_per_iter", "data_time"],
            resume_step,
        )
        self.eval_csv = CSVLog(output_dir / "eval_log.csv", EVAL_LOG_FIELDS, resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(output_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
            )

    def log_iter(
        self,
        epoch: int,
        iter_in_epoch: int,
        global_step: int,
        values: dict[str, float],
        lr: float,
        it_time: float,
        data_time: float,
    ) -> None:
        """One training iteration: its losses, the lr it used and its times."""
        row = {
            "epoch": epoch,
            "iter": iter_in_epoch,
            "global_step": global_step,
            "lr": f"{lr:.6g}",
            **{k: repr(v) for k, v in values.items()},
            "time_per_iter": f"{it_time:.4f}",
            "data_time": f"{data_time:.4f}",
        }
        self.train_csv.write(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, global_step)
            self.tb.add_scalar("train/lr", lr, global_step)

    def log_eval(self, epoch: int, global_step: int, metrics: dict[str, Any]) -> None:
        """One evaluation: the metrics table to the log, a CSV row, TensorBoard scalars."""
        logger.info("evaluation after epoch %d:\n%s", epoch, format_metrics_table(metrics))
        row = {"epoch": epoch, "global_step": global_step, **metrics}
        self.eval_csv.write(row)
        if self.tb is not None:
            for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "score_iou_pearson"):
                v = metrics.get(k)
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"val/{k}", v, global_step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
