"""Benchmark every operator x provider x size x dtype x mode, side by side in one run.

    python -m benchmarks.run [--device cpu|cuda] [--preset quick|core-targets|full] [--quick]
                             [--ops qfl,dfl,integral] [--dtypes float32,bfloat16]
                             [--modes fwd,fwd+bwd] [--providers eager,compile,...] [--out DIR]

Rows are appended to ``<out>/<device>.csv`` as each case finishes (a run cut short keeps what
it measured), then the plots and ``summary.md`` are regenerated from the CSVs in ``<out>``.
See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import cases as cases_mod
from benchmarks import csvio, peers, timing
from benchmarks.cases import MODES, OPS
from benchmarks.measure_case import Settings, bench_case
from benchmarks.measure_case import reference_output as reference_output  # its old home
from benchmarks.steps import INPUT_MODES

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


# --------------------------------------------------------------------------------------------
# command line


def _csv_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; expected some of {', '.join(allowed)}")
    return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark gfl_ops against the eager reference, torch.compile and "
        "Ultralytics' formulations; append rows to a CSV and regenerate the report.",
    )
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument(
        "--preset",
        choices=cases_mod.PRESETS,
        default="full",
        help="full: the issue's grid (trimmed on CPU); core-targets: the core "
        "issue's CPU target cases; gpu-targets: the large sizes of the GPU "
        "targets (fwd+bwd); quick: tiny sizes (smoke test)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="--preset quick with few repetitions, writing to results/quick/",
    )
    ap.add_argument(
        "--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS)
    )
    ap.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated; default float32,bfloat16 (core-targets: float32)",
    )
    ap.add_argument(
        "--modes",
        default=None,
        help="comma-separated subset of fwd,fwd+bwd; default both "
        "(core-targets, gpu-targets: fwd+bwd)",
    )
    ap.add_argument(
        "--providers",
        default=None,
        help="comma-separated provider names to keep (eager, compile, mmdet, "
        "ultralytics, gfl_ops-cpu, gfl_ops-cuda, gfl_ops-triton); default all "
        "available",
    )
    ap.add_argument(
        "--sizes",
        default=None,
        help="comma-separated RxC sizes to keep from the preset, e.g. 40000x80",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results, or "
        "benchmarks/results/quick with --quick)",
    )
    ap.add_argument(
        "--csv",
        default=None,
        help="CSV file name inside --out (default: <device type>-<device name>.csv)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="CPU: timed seconds per provider per case (default 0.5; core-targets 2.0; quick 0.05)",
    )
    ap.add_argument(
        "--min-reps",
        type=int,
        default=None,
        help="CPU: minimum repetitions (default 5; core-targets 10; quick 3)",
    )
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA warm-up per case")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="CUDA measuring time per case")
    ap.add_argument(
        "--cuda-timer",
        choices=("events", "triton"),
        default="events",
        help="events: do_bench's method, implemented here (reports reps); "
        "triton: triton.testing.do_bench itself",
    )
    ap.add_argument(
        "--rotate-mb",
        type=float,
        default=None,
        help="bytes of input copies cycled through (default: 4x L2 on CUDA, 256 MB on CPU)",
    )
    ap.add_argument(
        "--compile-dynamic",
        choices=("auto", "true", "false"),
        default=None,
        help="torch.compile(dynamic=...): auto = torch's default (specialise, then "
        "generalise on a new shape); true = one dynamic-shape compilation; "
        "false = one compilation per shape (default: false for the target "
        "presets, true otherwise)",
    )
    ap.add_argument(
        "--inputs",
        choices=INPUT_MODES,
        default=None,
        help="fresh: a new pred every call, its gradient flowing into a head, as in "
        "a training step (the CPU default); reused: the same input tensors "
        "cycled (the CUDA default: its caching allocator makes both alike)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    ap.add_argument(
        "--no-check",
        action="store_true",
        help="skip the float64 accuracy check of each provider's forward",
    )
    ap.add_argument("--no-report", action="store_true", help="do not regenerate plots/summary")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.preset == "quick"
    core = args.preset == "core-targets"
    targets = args.preset in ("core-targets", "gpu-targets")
    ops = _csv_list(args.ops, OPS, "op")
    dtypes = _csv_list(
        args.dtypes or ("float32" if core else "float32,bfloat16"), tuple(_DTYPES), "dtype"
    )
    modes = _csv_list(args.modes or ("fwd+bwd" if targets else ",".join(MODES)), MODES, "mode")
    wanted = set(args.providers.split(",")) if args.providers else None
    sizes = set(args.sizes.split(",")) if args.sizes else None
    out_dir = args.out or (RESULTS_DIR / "quick" if quick else RESULTS_DIR)
    # The target presets specialise every shape (the strongest compile peer, one compilation
    # per size); the grids compile once with dynamic shapes (automatic dynamic would compile
    # each graph three times: static, C dynamic, then N dynamic too).
    dynamic = {"auto": None, "true": True, "false": False}[
        args.compile_dynamic or ("false" if targets else "true")
    ]

    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        rotate = 4 * l2
    else:
        rotate = 256 << 20
    if args.rotate_mb is not None:
        rotate = int(args.rotate_mb * 2**20)
    settings = Settings(
        device=device,
        preset=args.preset,
        # core-targets is five cases: spend more repetitions on them (steadier medians on a
        # shared machine); the full grid keeps to ~20 minutes on 2 cores
        budget_s=args.budget_s
        if args.budget_s is not None
        else (0.05 if quick else 2.0 if core else 0.5),
        warmup_s=0.02 if quick else 0.1,
        min_reps=args.min_reps
        if args.min_reps is not None
        else (3 if quick else 10 if core else 5),
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        cuda_timer=args.cuda_timer,
        rotate_bytes=rotate if not quick else min(rotate, 16 << 20),
        max_sets=64,
        memory=not args.no_memory,
        check=not args.no_check,
        inputs=args.inputs or ("fresh" if device.type == "cpu" else "reused"),
    )

    meta = csvio.run_metadata(device, args.preset)
    meta["inputs"] = settings.inputs
    copy_bps = timing.copy_bandwidth(
        device,
        timer=args.cuda_timer,
        nbytes=(32 << 20) if quick else None,
        budget_s=0.1 if quick else 0.5,
    )
    meta["copy_gbps"] = f"{copy_bps / 1e9:.4g}"
    path = csvio.csv_path(out_dir, device, args.csv)
    selected = [
        c
        for c in cases_mod.preset_cases(args.preset, device.type)
        if c.op in ops and (sizes is None or c.size in sizes)
    ]
    print(
        f"# {meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"commit {meta['git_commit'][:10]} ({'dirty' if meta['git_dirty'] == 'yes' else 'clean'})"
        f" | {meta['cpu_threads']} threads | copy bandwidth {copy_bps / 1e9:.1f} GB/s"
    )
    print(
        f"# preset {args.preset}: {len(selected)} sizes x {len(dtypes)} dtypes x {len(modes)} "
        f"modes; {settings.inputs} inputs; torch.compile dynamic={dynamic}; rows -> {path}"
    )
    print(
        f"# gfl_ops backends timed: {', '.join(peers.ours_backends(device.type)) or 'none'}"
        " (available_backends minus 'reference', which is the eager peer)"
    )
    for name, status in peers.peer_status().items():
        print(f"# framework peer {name}: {status}")
    compiled = peers.make_compiled(dynamic)
    header = (
        f"{'op':<8} {'mode':<7} {'dtype':<8} {'size':>10} {'provider':<14} "
        f"{'median ms':>10} {'p20-p80':>17} {'x eager':>8} {'x comp':>7} "
        f"{'%copyBW':>7} {'xtra/grad':>9}"
    )
    print(header)
    started = time.perf_counter()
    reference_cache: dict = {}
    for case in selected:
        for dtype_name in dtypes:
            dtype = _DTYPES[dtype_name]
            for mode in modes:
                providers = peers.build_providers(
                    case.op, dtype, device, case.cols, compiled, wanted
                )
                rows = bench_case(case, dtype, mode, providers, settings, copy_bps, reference_cache)
                for row in rows:
                    row.update(meta)
                    print(_format_row(row))
                csvio.append_rows(path, rows)
                sys.stdout.flush()
    print(
        f"# {len(selected)} sizes measured in {time.perf_counter() - started:.0f} s; "
        f"rows appended to {path}"
    )
    if not args.no_report:
        from benchmarks import report

        written = report.generate(out_dir)
        for p in written:
            print(f"# wrote {p}")
    return 0


def _format_row(row: dict) -> str:
    def num(key: str, fmt: str) -> str:
        v = row.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

    spread = (
        f"{num('p20_ms', '.4g')}-{num('p80_ms', '.4g')}"
        if row.get("median_ms") is not None
        else "-"
    )
    frac = row.get("frac_copy_bw")
    line = (
        f"{row['op']:<8} {row['mode']:<7} {row['dtype']:<8} {row['size']:>10} "
        f"{row['provider']:<14} {num('median_ms', '10.4g')} {spread:>17} "
        f"{num('speedup_vs_eager', '8.2f')} {num('speedup_vs_compile', '7.2f')} "
        f"{(f'{100 * frac:6.1f}%' if frac else '-'):>7} {num('extra_per_grad', '9.2f')}"
    )
    if row.get("notes"):
        line += f"  [{row['notes']}]"
    return line


if __name__ == "__main__":
    sys.exit(main())
