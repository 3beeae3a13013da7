"""Run a sweep: skip what is finished, train the rest in worker processes, record each result.

A run is finished when a study CSV in the output folder holds a row with its run key (another
study's row for the same experiment is copied, not re-trained), or when its work folder
``WORK/<key>/result.json`` exists (recorded, then). Everything else is trained by
``python -m detector.ablation.worker WORK/<key>``, ``jobs`` at a time, each with
``threads`` torch threads; a worker resumes from the checkpoint an interrupted attempt left.

Interrupting the sweep (Ctrl-C, SIGTERM) stops the workers with one SIGTERM each (they write
a checkpoint after their current iteration) and exits; running the same command again
continues. Workers also get SIGTERM if the sweep dies without warning (Linux), and a per-run
lock keeps a late worker and its successor from writing the same folder at once.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from .data import DatasetSpec
from .plan import RunSpec
from .results import find_row_by_key, read_rows, upsert_rows
from .worker import REPO, read_json, write_json

__all__ = ["SweepOptions", "Task", "SweepOutcome", "run_sweep", "make_row", "group_tasks"]


@dataclass
class SweepOptions:
    """Where results and work go, and how runs are executed."""

    out_dir: Path
    work_dir: Path
    dataset: DatasetSpec
    budget: str  # readable budget description for the CSV
    budget_id: str
    jobs: int = 1
    threads: int | None = None  # torch threads per worker (None: cores // jobs)
    device: str | None = None
    progress: bool = True
    keep_checkpoints: bool = False
    stop_after_iters: int | None = None  # tests: make workers stop (as on SIGTERM) early
    poll_seconds: float = 1.0


@dataclass
class Task:
    """One experiment to train and the (study, setting, seed) rows it produces."""

    key: str
    config: ExperimentConfig
    specs: list[RunSpec] = field(default_factory=list)

    def describe(self) -> str:
        names = ", ".join(f"{s.study}/{s.setting}" for s in self.specs)
        return f"{names} seed {self.specs[0].seed}"


@dataclass
class SweepOutcome:
    """``already``: runs finished before; ``completed``/``failed``: this time; ``interrupted``."""

    already: int = 0
    completed: list[Task] = field(default_factory=list)
    failed: list[Task] = field(default_factory=list)
    interrupted: bool = False


def make_row(spec: RunSpec, result: dict[str, Any], opts: SweepOptions) -> dict[str, Any]:
    """The CSV row of ``spec`` from a worker's ``result.json``."""
    cfg = spec.config
    row: dict[str, Any] = {"study": spec.study, "setting": spec.setting, "seed": spec.seed}
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "score_iou_r"):
        v = result.get(k)
        row[k] = "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(v)
    for k in (
        "train_seconds",
        "commit",
        "device",
        "torch",
        "eval_seconds",
        "iterations",
        "finished_at",
    ):
        row[k] = result.get(k, "")
    row.update(
        epochs=cfg.train.epochs,
        img_size=max(cfg.data.img_scale),
        dataset=opts.dataset.ident,
        budget=opts.budget,
        budget_id=opts.budget_id,
        run_key=spec.key,
    )
    return row


def group_tasks(
    specs: Sequence[RunSpec], opts: SweepOptions, record: Callable[[list[dict[str, Any]]], None]
) -> tuple[int, list[Task]]:
    """Record what is already finished; return (how many runs were, the tasks left to train)."""
    recorded = {
        (r["study"], r.get("run_key"))
        for s in {sp.study for sp in specs}
        for r in read_rows(opts.out_dir / f"{s}.csv")
        if r.get("budget_id") == opts.budget_id
    }
    tasks: dict[str, Task] = {}
    done_keys: set[str] = set()
    rows = []
    for spec in specs:
        if (spec.study, spec.key) in recorded:
            done_keys.add(spec.key)
            continue
        shared = find_row_by_key(opts.out_dir, spec.key)
        result = read_json(opts.work_dir / spec.key / "result.json")
        if shared is not None:
            rows.append({**shared, "study": spec.study, "setting": spec.setting})
            done_keys.add(spec.key)
        elif result is not None:
            rows.append(make_row(spec, result, opts))
            done_keys.add(spec.key)
        else:
            tasks.setdefault(spec.key, Task(spec.key, spec.config)).specs.append(spec)
    if rows:
        record(rows)
    return len(done_keys - set(tasks)), list(tasks.values())


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the sweep process dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch_worker(task: Task, opts: SweepOptions) -> subprocess.Popen:
    """Start ``python -m detector.ablation.worker`` for ``task`` (output in worker.log)."""
    run_dir = opts.work_dir / task.key
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = opts.threads or max(1, (os.cpu_count() or 1) // max(opts.jobs, 1))
    write_json(
        run_dir / "run.json",
        {
            "runs": [f"{s.study}/{s.setting}/seed{s.seed}" for s in task.specs],
            "config": task.config.to_dict(),
            "paths": opts.dataset.paths(),
            "device": opts.device,
            "threads": threads,
            "stop_after_iters": opts.stop_after_iters,
            "keep_checkpoints": opts.keep_checkpoints,
        },
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    with open(run_dir / "worker.log", "ab") as log:
        # own session: a Ctrl-C reaches the sweep only, which then stops each worker once
        return subprocess.Popen(
            [sys.executable, "-m", "detector.ablation.worker", str(run_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _fraction(run_dir: Path) -> float:
    """How far a running worker is (training counts 95 %, evaluation the rest)."""
    p = read_json(run_dir / "progress.json") or {}
    if p.get("phase") == "eval":
        return 0.95
    total = p.get("total") or 0
    return 0.95 * min(1.0, p.get("step", 0) / total) if total else 0.0


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise _Stop


def run_sweep(
    specs: Sequence[RunSpec],
    opts: SweepOptions,
    record: Callable[[list[dict[str, Any]]], None] | None = None,
    launcher: Callable[[Task, SweepOptions], Any] = launch_worker,
    write: Callable[[str], None] = print,
) -> SweepOutcome:
    """Train every run of ``specs`` that is not finished; ``record(rows)`` is called with the
    CSV rows of each finished run (default: upsert into ``OUT/<study>.csv``)."""
    from tqdm import tqdm

    record = record or (lambda rows: record_rows(rows, opts.out_dir))
    already, tasks = group_tasks(specs, opts, record)
    out = SweepOutcome(already=already)
    total = already + len(tasks)
    write(
        f"{total} runs in this sweep: {already} already finished, {len(tasks)} to train "
        f"({opts.jobs} at a time)"
    )
    if not tasks:
        return out
    bar = tqdm(
        total=total,
        initial=already,
        unit="run",
        smoothing=0,
        dynamic_ncols=True,
        disable=not opts.progress,
        bar_format="{l_bar}{bar}| {n:.2f}/{total} runs [{elapsed}<{remaining}]{postfix}",
    )
    write = tqdm.write if opts.progress else write
    pending = list(tasks)
    running: dict[Any, Task] = {}
    old_handler = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        old_handler = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        while pending or running:
            while pending and len(running) < max(opts.jobs, 1):
                task = pending.pop(0)
                running[launcher(task, opts)] = task
            time.sleep(opts.poll_seconds)
            for proc, task in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[proc]
                _finish(task, rc, opts, record, out, write)
            bar.n = (
                already
                + len(out.completed)
                + len(out.failed)
                + sum(_fraction(opts.work_dir / t.key) for t in running.values())
            )
            bar.set_postfix_str(", ".join(t.describe() for t in running.values()), refresh=False)
            bar.refresh()
    except (KeyboardInterrupt, _Stop):
        out.interrupted = True
        write("stopping: each running worker writes a checkpoint after its current iteration")
        _stop_workers(running)
        write(
            "stopped; run the same command again to continue (finished runs are kept, "
            "interrupted ones resume from their checkpoints)"
        )
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return out


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _finish(
    task: Task,
    rc: int,
    opts: SweepOptions,
    record: Callable,
    out: SweepOutcome,
    write: Callable[[str], None],
) -> None:
    run_dir = opts.work_dir / task.key
    result = read_json(run_dir / "result.json")
    if rc == 0 and result is not None:
        record([make_row(s, result, opts) for s in task.specs])
        out.completed.append(task)
        write(
            f"done {task.describe()}: AP {100 * result['AP']:.1f}  AP50 "
            f"{100 * result['AP50']:.1f}  r {result['score_iou_r']:.3f}  "
            f"({result['train_seconds']:.0f} s training, {result['eval_seconds']:.0f} s eval)"
        )
    else:
        out.failed.append(task)
        what = "stopped (exit 3)" if rc == 3 else f"failed (exit {rc})"
        write(
            f"{what}: {task.describe()}; log {run_dir / 'worker.log'}:\n"
            f"{_log_tail(run_dir / 'worker.log')}"
        )


def _stop_workers(running: dict[Any, Task], timeout: float = 120.0) -> None:
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def record_rows(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Upsert rows into their studies' CSVs."""
    by_study: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_study.setdefault(str(r["study"]), []).append(r)
    for study, rs in by_study.items():
        upsert_rows(out_dir / f"{study}.csv", rs)
