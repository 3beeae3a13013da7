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

Budget: under 8 minutes on an H100/H200, ``--quick`` under 3, by construction: whatever the steps
take, none starts (and none runs on) past HARD_LIMIT_S = 470 s (``--quick``: HARD_LIMIT_QUICK_S =
170 s), which leaves ~10 s of the 8 (3) minutes for the interpreter's start and the last report,
and is well inside the device tool's 600 s per command, so the report is always written.
``--steps`` runs a subset (a second call: what the first had no time for).  ``--dry-run``
rehearses every step on a CPU machine (build command printed, tests collected, the benchmark and
the detector step run on the CPU at tiny sizes, the report written), so that the first real run
is not its debugging session; tests/test_gpu_check.py runs it in CI.  The commit comes from git,
or from ``$GFL_BENCH_COMMIT`` where the copy has no ``.git``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_check_report import publish_report
from benchmarks.gpu_check_steps import (
    CAPS,
    Step,
    detector_step,
    env_report,
    frameworks_step,
    run_in_process,
    run_step,
    start_clock,
    sweep_step,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

# the operator tests worth GPU time, cheapest and most GPU-specific first
TESTS_QUICK = [
    "tests/test_cuda_only.py",
    "tests/test_api.py",
    "tests/test_gradients_beyond_pred.py",
]
TESTS_FULL = TESTS_QUICK + [
    # the CUDA QFL kernels' PTX clamp of an unchecked activated input (max.NaN / min.NaN): the
    # warp emulator runs its C++ stand-in, only a GPU runs the PTX (not in --quick: it compiles
    # the Triton kernels' activated variants in every dtype)
    "tests/test_unchecked_values.py",
    "tests/test_qfl.py",
    "tests/test_dfl.py",
    "tests/test_integral.py",
    "tests/test_torch_integration.py",
    "tests/test_triton_backend.py",
]

# the steps --steps can choose (env and build always run)
OPTIONAL_STEPS = ("tests", "bench", "detector", "frameworks", "sweep")
# no step runs past this many seconds from the start, whatever its cap: the budget (8
# minutes; --quick 3) less ~10 s for the interpreter's start and the final report.  (The device
# tool kills a command at 600 s: the report must be written before that, and is.)
HARD_LIMIT_S = 470
HARD_LIMIT_QUICK_S = 170


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
    start_clock(started, HARD_LIMIT_QUICK_S if args.quick else HARD_LIMIT_S)
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
        return publish_report(
            args, info, steps, bench_dir, return_dir, time.perf_counter() - started
        )

    t0 = time.perf_counter()
    info = env_report(device)
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
        run_step(steps["build"], build_cmd, CAPS["build"][cap_index], build_env)
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
            run_step(steps["tests"], test_cmd, CAPS["tests"][cap_index])
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
            run_step(
                steps["bench"], bench_cmd, CAPS["bench"][cap_index], {"GFL_OPS_CHECK_VALUES": "0"}
            )
        if steps["bench"].status == "ok":  # its summary line, not a library's last warning
            summary = [
                line for line in steps["bench"].log[-1].splitlines() if line.startswith("# ")
            ]
            steps["bench"].detail = summary[-1] if summary else steps["bench"].detail
        publish()

        if "detector" in selected:
            run_in_process(
                steps["detector"],
                lambda: detector_step(device, args.dry_run),
                CAPS["detector"][cap_index],
            )
        publish()
        if "frameworks" in selected:
            frameworks_step(steps["frameworks"], args, return_dir)
            publish()
        if "sweep" in selected:
            sweep_step(steps["sweep"], args, return_dir, time.perf_counter() - started)
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
