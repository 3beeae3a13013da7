"""The steps of ``make gpu-check`` (benchmarks/gpu_check.py): a command under its time cap and
the check's hard limit, the environment, the detector's training step, the frameworks
benchmark and the kernel sweep."""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# seconds per step: full run, --quick run
CAPS = {
    "build": (150, 120),
    "tests": (200, 60),
    "bench": (150, 45),
    "detector": (40, 25),
    "frameworks": (90, 0),  # full run only
}
# the sweep gets what the steps before it left of this budget, at most SWEEP_MAX_S of timing
# (plus SWEEP_SETUP_S to start, measure the copy bandwidth and write its report)
TOTAL_BUDGET_S, SWEEP_MAX_S, SWEEP_MIN_S, SWEEP_SETUP_S = 450, 60, 10, 40
# a step with less than this left before the check's hard limit is skipped
MIN_STEP_S = 15
_deadline, _limit_s = float("inf"), float("inf")  # set by start_clock()


def start_clock(started: float, limit_s: float) -> None:
    """No step runs past ``limit_s`` seconds after ``started`` (a perf_counter() time)."""
    global _deadline, _limit_s
    _deadline, _limit_s = started + limit_s, limit_s


def time_left() -> float:
    return _deadline - time.perf_counter()


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok | FAILED | TIMEOUT | skipped | dry-run
    seconds: float = 0.0
    detail: str = ""
    log: list[str] = field(default_factory=list)


def run_step(step: Step, cmd: list[str], cap: float, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` in the repository with a time cap (cut to what is left before the hard
    limit; skipped when under MIN_STEP_S is left); stdout/stderr go to the step's log."""
    if time_left() < MIN_STEP_S:
        _skip_for_time(step)
        return
    cap = min(cap, time_left())
    print(f"\n## {step.name}: {' '.join(cmd)}  (cap {cap:.0f} s)", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            timeout=cap,
            capture_output=True,
            text=True,
        )
        output = proc.stdout + proc.stderr
        step.status = "ok" if proc.returncode == 0 else "FAILED"
        tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
        step.detail = step.detail or (tail[-1] if tail else f"exit {proc.returncode}")
    except subprocess.TimeoutExpired as exc:
        # (the partial output comes back as bytes even with text=True)
        partial = exc.stdout or b""
        output = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        step.status = "TIMEOUT"
        step.detail = f"stopped at its {cap:.0f} s cap"
    step.seconds = time.perf_counter() - started
    step.log.append(output)
    print(output[-3000:], flush=True)
    print(f"## {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)


def _skip_for_time(step: Step) -> None:
    step.status = "skipped"
    step.detail = f"no time left before the {_limit_s:.0f} s limit of the whole check"


def run_in_process(step: Step, fn: Callable[[], str], cap: float) -> None:
    """``fn()`` (returns the step's detail) in this process, which no cap can stop: skipped
    unless ``cap`` seconds are left before the hard limit; an exception is reported."""
    print(f"\n## {step.name}", flush=True)
    if time_left() < cap:
        _skip_for_time(step)
    else:
        started = time.perf_counter()
        try:
            step.detail, step.status = fn(), "ok"
        except Exception as exc:  # noqa: BLE001 - reported, and the report still written
            step.status, step.detail = "FAILED", repr(exc)[:300]
        step.seconds = time.perf_counter() - started
    print(f"## {step.name}: {step.status}: {step.detail}", flush=True)


def env_report(device: torch.device) -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "device_type": device.type,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        info["triton"] = f"n/a ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=str(props.multi_processor_count),
            memory_gb=f"{props.total_memory / 2**30:.0f}",
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            info["driver, SM clock, memory clock"] = out.stdout.strip()
    else:
        from benchmarks.csvio import cpu_name

        info["device"] = cpu_name()
    from benchmarks.csvio import git_commit

    info["commit"], info["dirty"] = git_commit()
    return info


def detector_step(device: torch.device, dry_run: bool) -> str:
    """One training step of the detector per gfl_ops backend against the reference losses:
    returns a one-line summary (loss agreement and median step time); raises on disagreement."""
    import gfl_ops
    from benchmarks.e2e_loss_step import make_targets
    from detector.models import build_detector

    depth, size = (18, 128) if dry_run else (50, 640)
    backends = ["reference"] + [
        b for b in gfl_ops.available_backends(device.type) if b in ("cpu", "cuda", "triton")
    ]
    if dry_run:
        backends = [b for b in backends if b != "triton"]  # the CPU interpreter is too slow
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=gen).to(device)
    targets = make_targets(2, size, size, 8, 80, device)
    results = []
    state = None
    for backend in backends:
        torch.manual_seed(0)
        model = (
            build_detector(depth=depth, num_classes=80, pretrained=None, gfl_backend=backend)
            .to(device)
            .train()
        )
        if state is None:  # a copy: the live tensors change with every step
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        times, first = [], None
        for _ in range(3 if dry_run else 4):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses = model(images, targets)
            optim.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optim.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if first is None:
                first = {k: float(v.detach()) for k, v in losses.items()}
            model.load_state_dict(state)  # every step from the same weights
        results.append((backend, first, statistics.median(times[1:]) * 1e3))
    ref = results[0][1]
    parts = []
    for backend, losses, ms in results:
        worst = max(abs(losses[k] - ref[k]) / max(abs(ref[k]), 1e-6) for k in ref)
        parts.append(
            f"{backend}: {ms:.1f} ms/step, loss {losses['loss']:.5f} (max rel diff {worst:.1e})"
        )
        if worst > 1e-3:
            raise AssertionError(
                f"detector losses of backend {backend} differ from the reference: {losses} vs {ref}"
            )
    return f"ResNet-{depth} GFL, 2 x {size}x{size}: " + "; ".join(parts)


def frameworks_step(step: Step, args: argparse.Namespace, out_dir: Path) -> None:
    """benchmarks.e2e_frameworks (mmdetection's GFLHead and RTMDet head and YOLOv8n, stock vs
    fused, one training step each) where both frameworks import: the lent GPU machine has
    neither, so they travel as wheels (make gpu-wheels; benchmarks/README.md, "The GPU
    check")."""
    if args.quick:
        step.status, step.detail = "skipped", "full run only (make gpu-check without QUICK)"
        return
    missing = [m for m in ("mmdet", "mmengine", "mmcv", "ultralytics") if not find_spec(m)]
    if missing:
        step.status = "skipped"
        step.detail = (
            f"not importable here: {', '.join(missing)} -- carry the wheels `make gpu-wheels` "
            "fetches (benchmarks/README.md, 'The GPU check')"
        )
        return
    cmd = [sys.executable, "-m", "benchmarks.e2e_frameworks", "--out", str(out_dir)]
    if args.dry_run:  # the wiring: one step of each at a small size on the CPU
        cmd += ["--device", "cpu", "--steps", "1", "--image", "128"]
    else:
        cmd += ["--device", "cuda"]
    run_step(step, cmd, CAPS["frameworks"][0])
    if step.status == "ok":
        speedups = [
            f"{m.group(1).strip()}: step x{m.group(2)}, loss x{m.group(3)}"
            for m in (
                re.match(r"(.+?)\s+fused\s.*step x([\d.]+)\s+loss x([\d.]+)", line)
                for line in step.log[-1].splitlines()
            )
            if m
        ]
        step.detail = "; ".join(speedups) or step.detail


def sweep_step(step: Step, args: argparse.Namespace, return_dir: Path, elapsed: float) -> None:
    """benchmarks.kernel_sweep for what is left of the budget (not with --quick)."""
    if args.quick:
        step.status, step.detail = "skipped", "full run only (make gpu-check without QUICK)"
        return
    # alone (a second call's --steps sweep): all the time the hard limit leaves
    alone = args.part == "sweep"
    budget = (
        _limit_s - SWEEP_SETUP_S - elapsed if alone else min(SWEEP_MAX_S, TOTAL_BUDGET_S - elapsed)
    )
    if budget < SWEEP_MIN_S and not args.dry_run:
        step.status = "skipped"
        step.detail = f"{elapsed:.0f} s used: no time left in the {TOTAL_BUDGET_S} s budget"
        return
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.kernel_sweep",
        "run",
        "--budget-s",
        f"{max(budget, 1.0):.0f}",
        "--out",
        str(return_dir),
    ]
    if args.dry_run:
        cmd.append("--dry-run")
    run_step(step, cmd, max(budget, 1.0) + SWEEP_SETUP_S)
    if step.status == "ok":
        step.detail = next(
            (
                line[len("sweep: ") :]
                for line in step.log[-1].splitlines()
                if line.startswith("sweep: ")
            ),
            step.detail,
        )
