"""``make gpu-check`` rehearsed on the CPU (``--dry-run``): every step is wired (the build command
formed, the GPU test files collected, the benchmark and a detector training step run at tiny
sizes) and the report is written, so the first run on a lent GPU is not its debugging session."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from gfl_testing import needs_detector_torch

REPO = Path(__file__).resolve().parent.parent
FRAMEWORKS = all(find_spec(m) for m in ("mmdet", "mmengine", "mmcv", "ultralytics"))


@needs_detector_torch
def test_gpu_check_dry_run_runs_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--dry-run",
            "--out",
            str(tmp_path / "report"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = [p for p in (tmp_path / "report").glob("gpu-*-dry-run.*") if "sweep" not in p.name]
    (md,) = [p for p in report if p.suffix == ".md"]
    (csv_file,) = [p for p in report if p.suffix == ".csv"]
    text = md.read_text()
    for step, outcome in (
        ("env", "ok"),
        ("build", "dry-run"),
        ("tests", "ok"),
        ("bench", "ok"),
        ("detector", "ok"),
        # CI installs mmdet and ultralytics (the GPU machine needs their wheels); a venv without
        # them (scripts/check_torch_compat.sh's) sees the step skipped, saying why
        ("frameworks", "ok" if FRAMEWORKS else "skipped"),
        ("sweep", "ok"),
    ):
        assert f"| {step} | {outcome} |" in text, text
    assert "TORCH_CUDA_ARCH_LIST=" in text and "tests collected" in text
    assert "| commit |" in text and "| torch |" in text
    assert "integral" in csv_file.read_text()
    assert "### Under target" in text  # the kernel sweep's summary, in the report
    # a dry run's files say so in their names (they must not replace committed results)
    assert (tmp_path / "report" / "gpu-sweep-cpu-dry-run.csv").exists()
    if FRAMEWORKS:
        assert "GFLHead" in text and "RTMDet" in text and "YOLOv8n" in text  # frameworks table
        assert list((tmp_path / "report").glob("e2e-frameworks-cpu-*-dry-run.csv"))
    else:
        assert "carry the wheels `make gpu-wheels` fetches" in text
    # the device tool's return folder gets the report and the log
    assert {p.suffix for p in (tmp_path / "out").iterdir()} >= {".md", ".csv", ".log"}


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_gpu_check_stops_starting_steps_at_its_hard_limit(
    tmp_path: Path, monkeypatch, quick: bool
) -> None:
    """Issue #17's budget, 8 minutes (``--quick``: 3), holds by construction: past the hard limit
    (HARD_LIMIT_S, HARD_LIMIT_QUICK_S) no step starts or runs on, and the report (with every
    step's outcome) is still written."""
    from benchmarks import gpu_check

    # ~10 s of each budget is left for the interpreter's start and the final report
    assert gpu_check.HARD_LIMIT_S <= 8 * 60 - 10 and gpu_check.HARD_LIMIT_QUICK_S <= 3 * 60 - 10
    monkeypatch.setattr(gpu_check, "HARD_LIMIT_QUICK_S" if quick else "HARD_LIMIT_S", 0)
    monkeypatch.delenv("OUT", raising=False)
    argv = ["--dry-run", "--out", str(tmp_path)] + (["--quick"] if quick else [])
    assert gpu_check.main(argv) == 0
    (md,) = [p for p in tmp_path.glob("gpu-*-dry-run.md") if "sweep" not in p.name]
    text = md.read_text()
    for step in (
        ("tests", "bench", "detector")
        if quick
        else ("tests", "bench", "detector", "frameworks", "sweep")
    ):
        assert f"| {step} | skipped |" in text, text
    assert "no time left before the 0 s limit" in text


def test_gpu_check_runs_only_the_steps_asked_for(tmp_path: Path, monkeypatch) -> None:
    """A second call re-runs what the first had no time for, under its own report name."""
    from benchmarks import gpu_check

    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", "sweep"]) == 0
    (md,) = [p for p in tmp_path.glob("gpu-*-sweep-dry-run.md")]
    text = md.read_text()
    for step in ("tests", "bench", "detector", "frameworks"):
        assert f"| {step} | not selected |" in text, text
    assert "| sweep | ok |" in text and "STEPS=sweep" in text
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", "sweep,typo"])
