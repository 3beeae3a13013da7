"""``make gpu-check``: everything this project checks on a GPU, in one command of a few minutes.

    python -m benchmarks.gpu_check [--quick] [--dry-run] [--out DIR]

Written for the GPU machine lent to a session (one H100/H200, torch 2.11 + CUDA 13 + Triton 3.6,
Python 3.12, pytest and hypothesis, no network, no pycocotools, ~15 minutes of device time in
all), so the few minutes there go to one prepared command.  Steps, each with a time cap so that
one slow step cannot eat the others' time (a step past its cap is reported as TIMEOUT and the
check goes on):

1. ``env``: GPU, driver, capability, torch / CUDA / Triton versions.
2. ``build``: the extension for this GPU's architecture only (``TORCH_CUDA_ARCH_LIST`` = its
   capability, ``FORCE_CUDA=1``, all cores), in place, against the torch installed there.
3. ``tests``: the operator tests on CUDA tensors (CUDA and Triton backends; tests/test_cuda_only.py
   runs there and nowhere else).
4. ``bench``: ``benchmarks.run --preset gpu-targets`` (``--quick``: the quick preset): each op
   against the eager formulas and ``torch.compile`` of them, with the device's copy bandwidth
   measured in the same run and the % of it each kernel reaches.  The value checks are off for
   the timing (``GFL_OPS_CHECK_VALUES=0``): they add one host sync per call, which is a property
   of the checks, not of the kernels; the report says so.
5. ``detector``: one training step of the project's detector (GFL, ResNet-50-FPN) per GPU
   backend against the reference losses: loss values agree, step time.
6. ``frameworks`` (not with ``--quick``): ``benchmarks.e2e_frameworks``: one training step of
   mmdetection's GFLHead and of YOLOv8n, stock vs fused -- where mmdet and ultralytics import;
   the lent machine has neither, so they travel as wheels (``make gpu-wheels``).
7. ``sweep`` (not with ``--quick``): ``benchmarks.kernel_sweep run``: every launch mode of the
   CUDA kernels (bins 2..64, every QFL mode, forward / fused / backward, three dtypes) timed
   alone as % of copy bandwidth beside its bound on paper, in priority order, for what is left
   of the 8-minute budget (at most SWEEP_MAX_S).
8. ``report``: ``<out>/gpu-<device>.csv`` (the benchmark rows) and ``gpu-<device>.md`` (device,
   versions, commit, every step's outcome and time, the benchmark table, the sweep's summary),
   with the sweep's own ``gpu-sweep-<device>.{csv,md}``; copied to ``$OUT`` too when that is
   set (the device tool's return folder).  The report is rewritten after every step and the
   sweep writes each row as it is measured (into ``$OUT`` when set), so a run stopped by the
   device's time limit still returns everything it finished.

Budget: under 8 minutes on an H100/H200, ``--quick`` under 3; whatever the steps take, none starts
(and none runs on) past HARD_LIMIT_S = 540 s, inside the device tool's 600 s per command, so the
report is always written; ``--steps`` runs a subset (a second call: what the first had no time
for).  ``--dry-run`` rehearses every step
on a CPU machine (build command printed, tests collected, the benchmark and the detector step run
on the CPU at tiny sizes, the report written), so that the first real run is not its debugging
session; tests/test_gpu_check.py runs it in CI.  The commit comes from git, or from
``$GFL_BENCH_COMMIT`` where the copy has no ``.git``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

# the operator tests worth GPU time, cheapest and most GPU-specific first
TESTS_QUICK = [
    "tests/test_cuda_only.py",
    "tests/test_api.py",
    "tests/test_gradients_beyond_pred.py",
]
TESTS_FULL = TESTS_QUICK + [
    "tests/test_qfl.py",
    "tests/test_dfl.py",
    "tests/test_integral.py",
    "tests/test_torch_integration.py",
    "tests/test_triton_backend.py",
]

# the steps --steps can choose (env and build always run)
OPTIONAL_STEPS = ("tests", "bench", "detector", "frameworks", "sweep")

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
# and no step runs past this many seconds from the start, whatever its cap: the device tool
# kills a command at 600 s, and the report must be written before that
HARD_LIMIT_S, MIN_STEP_S = 540, 15
_deadline = float("inf")  # perf_counter() time of HARD_LIMIT_S; set by main()


def _time_left() -> float:
    return _deadline - time.perf_counter()


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok | FAILED | TIMEOUT | skipped | dry-run
    seconds: float = 0.0
    detail: str = ""
    log: list[str] = field(default_factory=list)


def _run(step: Step, cmd: list[str], cap: float, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` in the repository with a time cap (cut to what is left before the hard
    limit; skipped when under MIN_STEP_S is left); stdout/stderr go to the step's log."""
    if _time_left() < MIN_STEP_S:
        step.status = "skipped"
        step.detail = f"no time left before the {HARD_LIMIT_S} s limit of the whole check"
        return
    cap = min(cap, _time_left())
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


def _env_report(device: torch.device) -> dict[str, str]:
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


def _detector_step(device: torch.device, dry_run: bool) -> str:
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


def _frameworks_step(step: Step, args: argparse.Namespace, out_dir: Path) -> None:
    """benchmarks.e2e_frameworks (mmdetection's GFLHead and YOLOv8n, stock vs fused, one
    training step each) where both frameworks import: the lent GPU machine has neither, so they
    travel as wheels (make gpu-wheels; benchmarks/README.md, "The GPU check")."""
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
    _run(step, cmd, CAPS["frameworks"][0])
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


def _sweep_step(step: Step, args: argparse.Namespace, return_dir: Path, elapsed: float) -> None:
    """benchmarks.kernel_sweep for what is left of the budget (not with --quick)."""
    if args.quick:
        step.status, step.detail = "skipped", "full run only (make gpu-check without QUICK)"
        return
    # alone (a second call's --steps sweep): all the time the hard limit leaves
    alone = args.part == "sweep"
    budget = (
        HARD_LIMIT_S - SWEEP_SETUP_S - elapsed
        if alone
        else min(SWEEP_MAX_S, TOTAL_BUDGET_S - elapsed)
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
    _run(step, cmd, max(budget, 1.0) + SWEEP_SETUP_S)
    if step.status == "ok":
        step.detail = next(
            (
                line[len("sweep: ") :]
                for line in step.log[-1].splitlines()
                if line.startswith("sweep: ")
            ),
            step.detail,
        )


def _frameworks_summary(out_dir: Path) -> list[str]:
    """The frameworks benchmark's table (its title dropped), or a line saying there is none."""
    reports = sorted(out_dir.glob("e2e-frameworks-*.md"))
    if not reports:
        return ["", "(not run: see the frameworks step above)"]
    return reports[0].read_text(encoding="utf-8").splitlines()[1:]


def _sweep_summary(bench_dir: Path) -> list[str]:
    """The sweep report's body (its title dropped), or a line saying there is none."""
    reports = sorted(bench_dir.glob("gpu-sweep-*.md"))
    if not reports:
        return ["(the sweep did not run)"]
    body = reports[0].read_text(encoding="utf-8").splitlines()[1:]
    return [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body]


def _bench_table(csv_file: Path) -> list[str]:
    if not csv_file.exists():
        return ["(no benchmark rows)"]
    with open(csv_file, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    lines = [
        "| op | mode | dtype | size | provider | median ms | x eager | x compile | % copy BW |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        frac = r.get("frac_copy_bw") or ""
        pct = f"{float(frac):.0%}" if frac else ""
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['size']} | "
            f"{r['provider']} | {r['median_ms']} | {r['speedup_vs_eager']} | "
            f"{r['speedup_vs_compile']} | {pct} |"
        )
    copy = rows[0].get("copy_gbps", "?") if rows else "?"
    return [
        f"Copy bandwidth measured in the same run: {copy} GB/s (bytes read + written).",
        "",
        *lines,
    ]


def _publish(
    args: argparse.Namespace,
    info: dict[str, str],
    steps: dict[str, Step],
    bench_dir: Path,
    return_dir: Path,
    total_s: float,
) -> tuple[Path, Path]:
    """Writes the report (and the sweep's files) to args.out, copies them and the steps' logs to
    $OUT when that is a folder (the device tool's return folder)."""
    csv_out, md_out = _write_report(
        args.out, info, list(steps.values()), bench_dir / "bench.csv", return_dir, args, total_s
    )
    # (a dry run's files are named as such, beside the committed results they must not replace)
    for path in sorted([*return_dir.glob("gpu-sweep-*"), *return_dir.glob("e2e-frameworks-*")]):
        name = f"{path.stem}-dry-run{path.suffix}" if args.dry_run else path.name
        if path.resolve() != (args.out / name).resolve():
            shutil.copyfile(path, args.out / name)
    out_env = os.environ.get("OUT")
    if out_env and Path(out_env).is_dir():
        for path in (csv_out, md_out):
            if path.exists() and path.parent.resolve() != Path(out_env).resolve():
                shutil.copy(path, out_env)
        Path(out_env, "gpu-check.log").write_text(
            "\n".join(f"## {s.name}\n" + "\n".join(s.log) for s in steps.values())
        )
    return csv_out, md_out


def _write_report(
    out_dir: Path,
    info: dict[str, str],
    steps: list[Step],
    bench_csv: Path,
    return_dir: Path,
    args: argparse.Namespace,
    total_s: float,
) -> tuple[Path, Path]:
    from benchmarks.csvio import slug

    name = (
        "gpu-"
        + slug(info["device"].split(" (")[0])
        + (f"-{args.part}" if args.part else "")
        + ("-dry-run" if args.dry_run else "")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_out, md_out = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    if bench_csv.exists():
        shutil.copyfile(bench_csv, csv_out)
    lines = [
        f"# GPU check: {info['device']}",
        "",
        f"`make gpu-check{' QUICK=1' if args.quick else ''}"
        f"{f' STEPS={args.steps}' if args.part else ''}`"
        f"{' (dry run on a CPU machine)' if args.dry_run else ''}: {total_s:.0f} s in all, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "| step | outcome | seconds | detail |",
        "|---|---|---:|---|",
        *(
            f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail.replace('|', '/')} |"
            for s in steps
        ),
        "",
        "## Operators (benchmarks.run, value checks off: see benchmarks/gpu_check.py)",
        "",
        *_bench_table(bench_csv),
        "",
        "## In the frameworks (benchmarks.e2e_frameworks: one training step, stock vs fused)",
        *_frameworks_summary(return_dir),
        "",
        "## Kernel sweep (benchmarks.kernel_sweep: each launch mode alone, against the paper)",
        *_sweep_summary(return_dir),
        "",
    ]
    md_out.write_text("\n".join(lines), encoding="utf-8")
    return csv_out, md_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="fewer tests, the quick bench preset")
    ap.add_argument(
        "--dry-run", action="store_true", help="rehearse every step on a machine without a GPU"
    )
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the report goes")
    ap.add_argument(
        "--steps",
        default="all",
        help="a comma list of " + ", ".join(OPTIONAL_STEPS) + " (env and build always run; the "
        "build is incremental): to run in a second call what the first had no time for; the "
        "report's name then ends with the steps",
    )
    args = ap.parse_args(argv)
    selected = set(OPTIONAL_STEPS) if args.steps == "all" else set(args.steps.split(","))
    if not selected <= set(OPTIONAL_STEPS):
        ap.error(f"--steps: expected a comma list of {', '.join(OPTIONAL_STEPS)}, got {args.steps}")
    args.part = (
        ""
        if selected == set(OPTIONAL_STEPS)
        else "-".join(s for s in OPTIONAL_STEPS if s in selected)
    )
    started = time.perf_counter()
    global _deadline
    _deadline = started + HARD_LIMIT_S
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here; use --dry-run to rehearse on a CPU machine",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    cap_index = 1 if args.quick else 0
    steps = {
        name: Step(name)
        for name in ("env", "build", "tests", "bench", "detector", "frameworks", "sweep")
    }
    for name in OPTIONAL_STEPS:
        if name not in selected:
            steps[name].status = "not selected"
    bench_dir = Path(tempfile.mkdtemp(prefix="gfl_gpu_check_"))
    # the sweep writes its rows as it goes, straight into the device tool's return folder when
    # there is one: a run stopped by its time limit still brings back what it measured
    out_env = os.environ.get("OUT")
    return_dir = Path(out_env) if out_env and Path(out_env).is_dir() else bench_dir

    def publish() -> tuple[Path, Path]:
        """The report as it stands, written after every step (and copied to $OUT)."""
        return _publish(args, info, steps, bench_dir, return_dir, time.perf_counter() - started)

    t0 = time.perf_counter()
    info = _env_report(device)
    steps["env"].status, steps["env"].seconds = "ok", time.perf_counter() - t0
    steps["env"].detail = f"{info['device']}, torch {info['torch']}, triton {info['triton']}"
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    publish()

    build_env = {
        "FORCE_CUDA": "1",
        "MAX_JOBS": str(os.cpu_count() or 4),
        "TORCH_CUDA_ARCH_LIST": info.get("capability", "9.0"),
    }
    build_cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    if args.dry_run:
        steps["build"].status = "dry-run"
        steps["build"].detail = (
            " ".join(f"{k}={v}" for k, v in build_env.items()) + " " + " ".join(build_cmd[1:])
        )
    else:
        _run(steps["build"], build_cmd, CAPS["build"][cap_index], build_env)
        if steps["build"].status != "ok":
            steps["build"].detail = "build failed: see the log above; nothing else can run"
    publish()

    if steps["build"].status in ("ok", "dry-run"):
        tests = TESTS_QUICK if args.quick else TESTS_FULL
        test_cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-rfE",
            *tests,
        ]
        if args.dry_run:
            test_cmd.append("--collect-only")
        if "tests" in selected:
            _run(steps["tests"], test_cmd, CAPS["tests"][cap_index])
            publish()

        bench_cmd = [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--device",
            device.type,
            "--out",
            str(bench_dir),
            "--csv",
            "bench.csv",
            "--no-report",
        ]
        if args.quick or args.dry_run:
            bench_cmd.append("--quick")
        else:
            bench_cmd += ["--preset", "gpu-targets", "--no-memory"]
        if args.dry_run:  # the wiring, not the numbers: no compile, one op
            bench_cmd += ["--ops", "integral", "--providers", "eager,gfl_ops-cpu"]
        if "bench" in selected:
            _run(steps["bench"], bench_cmd, CAPS["bench"][cap_index], {"GFL_OPS_CHECK_VALUES": "0"})
        if steps["bench"].status == "ok":  # its summary line, not a library's last warning
            summary = [
                line for line in steps["bench"].log[-1].splitlines() if line.startswith("# ")
            ]
            steps["bench"].detail = summary[-1] if summary else steps["bench"].detail
        publish()

        t0 = time.perf_counter()
        print("\n## detector", flush=True)
        if "detector" not in selected:
            pass
        elif _time_left() < CAPS["detector"][cap_index]:  # in process: no cap can stop it
            steps["detector"].status = "skipped"
            steps["detector"].detail = f"no time left before the {HARD_LIMIT_S} s limit"
        else:
            try:
                steps["detector"].detail = _detector_step(device, args.dry_run)
                steps["detector"].status = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, and the report still written
                steps["detector"].status, steps["detector"].detail = "FAILED", repr(exc)[:300]
        steps["detector"].seconds = time.perf_counter() - t0
        if "detector" in selected:
            print(
                f"## detector: {steps['detector'].status}: {steps['detector'].detail}", flush=True
            )
        publish()
        if "frameworks" in selected:
            _frameworks_step(steps["frameworks"], args, return_dir)
            publish()
        if "sweep" in selected:
            _sweep_step(steps["sweep"], args, return_dir, time.perf_counter() - started)
    else:
        for name in selected:
            steps[name].status = "skipped"

    csv_out, md_out = publish()
    print("\n" + md_out.read_text(encoding="utf-8").split("## Operators")[0])
    print(f"wrote {csv_out} and {md_out}")
    bad = [s for s in steps.values() if s.status in ("FAILED", "TIMEOUT")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
