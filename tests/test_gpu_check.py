"""``make gpu-check`` rehearsed on the CPU (``--dry-run``): every step is wired (the build command
formed, the GPU test files collected, the benchmark and a detector training step run at tiny
sizes) and the report is written, so the first run on a lent GPU is not its debugging session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
    (md,) = (tmp_path / "report").glob("gpu-*-dry-run.md")
    (csv_file,) = (tmp_path / "report").glob("gpu-*-dry-run.csv")
    text = md.read_text()
    for step, outcome in (
        ("env", "ok"),
        ("build", "dry-run"),
        ("tests", "ok"),
        ("bench", "ok"),
        ("detector", "ok"),
        ("sweep", "ok"),
    ):
        assert f"| {step} | {outcome} |" in text, text
    assert "TORCH_CUDA_ARCH_LIST=" in text and "tests collected" in text
    assert "| commit |" in text and "| torch |" in text
    assert "integral" in csv_file.read_text()
    assert "### Under target" in text  # the kernel sweep's summary, in the report
    assert (tmp_path / "report" / "gpu-sweep-cpu.csv").exists()
    # the device tool's return folder gets the report and the log
    assert {p.suffix for p in (tmp_path / "out").iterdir()} >= {".md", ".csv", ".log"}
