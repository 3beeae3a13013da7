"""``python -m detector.ablation.worker RUN_DIR``: train and evaluate one run of a sweep.

``RUN_DIR/run.json`` (written by the runner) holds the experiment config, the dataset paths,
the device, the torch thread count and, for tests, ``stop_after_iters``. The worker

1. trains with :class:`detector.engine.Trainer`, resuming from ``RUN_DIR/latest.pth`` when an
   earlier attempt left one (periodic checkpoints every ``checkpoint_interval_iters``, and one on
   SIGINT/SIGTERM);
2. writes ``RUN_DIR/progress.json`` every 2 s (``step``, ``total``, ``phase``,
   ``train_seconds``), which the runner's progress bar reads;
3. evaluates the final model on the validation set (COCO metrics + score–IoU Pearson r), timed
   apart from the training;
4. writes ``RUN_DIR/result.json`` atomically and deletes the checkpoints (unless asked to keep
   them): a run with ``result.json`` is finished.

Exit status: 0 finished, 3 stopped by a signal after checkpointing (run it again to continue),
anything else a failure (traceback on stderr).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file and ``os.replace`` (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def git_commit(repo: Path = REPO) -> str:
    """Short commit hash of the code that runs, ``+dirty`` with uncommitted tracked changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: Any, threads: int) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA; the CPU model and torch's thread count on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({threads} threads)"


def lock_run_dir(run_dir: Path) -> Any:
    """Hold an exclusive lock on ``run_dir`` for this process's lifetime (returns the open lock
    file; None where ``fcntl`` is missing). A worker whose sweep was killed may still be writing
    its checkpoint when the next sweep starts the same run: the newcomer waits for it."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(run_dir / "lock", "w")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for an earlier worker of {run_dir} to exit", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


class ProgressReporter(threading.Thread):
    """Writes the trainer's step and the training seconds so far to ``progress.json`` every
    ``interval`` seconds (also what a killed attempt leaves for the next one's time count)."""

    def __init__(
        self, path: Path, trainer: Any, base_seconds: float, interval: float = 2.0
    ) -> None:
        super().__init__(daemon=True)
        self.path, self.trainer, self.base = path, trainer, base_seconds
        self.interval = interval
        self.t0 = time.perf_counter()
        self.phase = "train"
        self.stopped = threading.Event()

    def train_seconds(self) -> float:
        return self.base + time.perf_counter() - self.t0

    def write(self) -> None:
        write_json(
            self.path,
            {
                "step": self.trainer.global_step,
                "total": self.trainer.total_iters,
                "phase": self.phase,
                "train_seconds": self.train_seconds(),
            },
        )

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.write()


def run(run_dir: Path) -> int:
    """Train + evaluate the run described by ``run_dir/run.json``; see the module docstring."""
    import torch

    from ..config import ExperimentConfig
    from ..engine import Trainer, TrainingInterrupted, build_datasets, evaluate, setup_logging
    from ..metrics import METRIC_KEYS

    lock = lock_run_dir(run_dir)  # noqa: F841 - released when the process exits
    spec = json.loads((run_dir / "run.json").read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    setup_logging(None)  # stderr, which the runner keeps in worker.log
    cfg = ExperimentConfig.from_dict(spec["config"])
    paths = spec["paths"]
    before = read_json(run_dir / "progress.json") or {}
    trainer = Trainer(
        cfg,
        paths["train_ann"],
        paths["train_images"],
        None,
        None,
        run_dir,
        resume="auto",
        device=spec.get("device"),
        progress=False,
        tensorboard=False,
        stop_after_iters=spec.get("stop_after_iters"),
    )
    reporter = ProgressReporter(
        run_dir / "progress.json", trainer, float(before.get("train_seconds", 0.0))
    )
    reporter.start()
    try:
        try:
            trainer.train()
        except TrainingInterrupted:
            return 3
        finally:
            train_seconds = reporter.train_seconds()
            reporter.stopped.set()
            reporter.join()
            reporter.write()
        reporter.phase = "eval"
        reporter.base, reporter.t0 = train_seconds, time.perf_counter()  # frozen from here on
        reporter.write()
        _, val = build_datasets(cfg, None, None, paths["val_ann"], paths["val_images"])
        assert val is not None
        t0 = time.perf_counter()
        metrics, _ = evaluate(
            trainer.model,
            val,
            trainer.ctx,
            cfg.data.eval_batch_size,
            cfg.data.num_workers,
            cfg.train.amp,
            progress=False,
        )
        eval_seconds = time.perf_counter() - t0
    finally:
        trainer.close()
    threads = torch.get_num_threads()
    result = {
        **{k: metrics[k] for k in METRIC_KEYS},
        "score_iou_r": metrics["score_iou_pearson"],
        "num_detections": metrics.get("num_detections"),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "iterations": trainer.total_iters,
        "commit": git_commit(),
        "device": device_name(trainer.ctx.device, threads),
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(run_dir / "result.json", result)
    if not spec.get("keep_checkpoints"):
        for p in run_dir.glob("*.pth"):
            p.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m detector.ablation.worker RUN_DIR", file=sys.stderr)
        return 2
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
