"""The results CSV: its columns, the run metadata stamped on every row, appending and reading.

One file per device under ``benchmarks/results/`` (``<device type>-<device name>.csv``); every
run appends its rows, so the file is the history; the report keeps the newest row of each case.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

# The run metadata every CSV here starts with.  See benchmarks/README.md for the columns.
RUN_FIELDS = (
    "run_id",
    "date_utc",
    "preset",
    "device_type",
    "device_name",
    "cpu_threads",
    "torch",
    "triton",
    "cuda",
    "git_commit",
    "git_dirty",
)

# Columns of the microbenchmark CSV, in order.
FIELDS = RUN_FIELDS + (
    "copy_gbps",
    # 'fresh' or 'reused' inputs (benchmarks/steps.py); empty in rows from before it existed
    "inputs",
    # the case
    "op",
    "provider",
    "mode",
    "dtype",
    "size",
    "rows",
    "cols",
    "elements",
    # timing
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "rotating_sets",
    "speedup_vs_eager",
    "speedup_vs_compile",
    # memory
    "peak_extra_mb",
    "grad_mb",
    "extra_per_grad",
    # bandwidth
    "floor_bytes",
    "floor_ms",
    "time_over_floor",
    "achieved_gbps",
    "frac_copy_bw",
    # other
    "compile_s",
    "rel_err_fp64",
    "core_target",
    "notes",
)

# Columns of the end-to-end loss-step CSV (benchmarks/e2e_loss_step.py).
E2E_CSV = "e2e_loss_step.csv"
E2E_FIELDS = RUN_FIELDS + (
    "losses",
    "dtype",
    "batch",
    "image",
    "num_classes",
    "reg_max",
    "anchors",
    "positives",
    "assign_ms",
    "loss_ms",
    "loss_p20_ms",
    "loss_p80_ms",
    "step_ms",
    "loss_share",
    "loss_speedup",
    "reps",
    "model",
    "notes",
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> tuple[str, str]:
    """(commit, dirty) of the checkout; ``$GFL_BENCH_COMMIT`` wins (for copies without .git)."""
    env = os.environ.get("GFL_BENCH_COMMIT")
    if env:
        return env, "unknown"
    commit = _git("rev-parse", "HEAD") or "unknown"
    # the results folder is this harness's own output, not code: it does not make a run dirty
    status = _git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"
    )
    dirty = "unknown" if status is None else ("yes" if status else "no")
    return commit, dirty


def cpu_name() -> str:
    """The CPU model with the number of logical CPUs, e.g. 'Intel(R) Xeon(R) Processor (2 CPUs)'."""
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return "n/a"
    return str(triton.__version__)


def run_metadata(device: torch.device, preset: str) -> dict[str, str]:
    """The columns shared by every row of one run."""
    now = _dt.datetime.now(_dt.timezone.utc)
    commit, dirty = git_commit()
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ") + "-" + commit[:8],
        "date_utc": now.strftime("%Y-%m-%d %H:%M:%S"),
        "preset": preset,
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "n/a",
        "git_commit": commit,
        "git_dirty": dirty,
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def csv_path(out_dir: Path, device: torch.device, name: str | None = None) -> Path:
    """``<out_dir>/<device type>-<device name>.csv`` (or ``name`` if given)."""
    if name:
        return out_dir / name
    model = device_name(device).split(" (")[0]
    return out_dir / f"{device.type}-{slug(model)}.csv"


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return f"{value:.6g}"
    return str(value)


def append_rows(path: Path, rows: Iterable[dict], fields: tuple[str, ...] = FIELDS) -> None:
    """Append rows (dicts keyed by ``fields``), writing the header if the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != list(fields) and set(header) <= set(fields):
            # an older file lacking newer columns: rewrite it once with the full header
            old_rows = read_rows(path)
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(fields))
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in fields} for r in old_rows)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in fields})


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
