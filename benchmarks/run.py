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
import gc
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import cases as cases_mod
from benchmarks import csvio, peers, timing
from benchmarks.cases import MODES, OPS, Case, Inputs
from benchmarks.steps import INPUT_MODES, make_step

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class Settings:
    """How one run measures (from the command line)."""

    device: torch.device
    preset: str
    budget_s: float  # CPU: timed seconds per provider per case (split over rounds)
    warmup_s: float  # CPU: warm-up seconds per provider per case (at least 2 calls)
    min_reps: int
    warmup_ms: float  # CUDA
    rep_ms: float  # CUDA
    cuda_timer: str
    rotate_bytes: int  # input copies cycled through, up to this many bytes
    max_sets: int
    memory: bool
    check: bool
    inputs: str = "reused"  # 'fresh' | 'reused': see benchmarks/steps.py


# --------------------------------------------------------------------------------------------
# one case


def _rotation_sets(case: Case, dtype: torch.dtype, mode: str, settings: Settings) -> list[Inputs]:
    """Enough copies of the inputs that cycling through them defeats the caches."""
    requires_grad = mode == "fwd+bwd"
    first = cases_mod.make_inputs(case, dtype, settings.device, requires_grad, seed=0)
    per_set = max(cases_mod.input_bytes(first), 1)
    n_sets = int(min(settings.max_sets, max(1, math.ceil(settings.rotate_bytes / per_set))))
    return [first] + [
        cases_mod.make_inputs(case, dtype, settings.device, requires_grad, seed=i)
        for i in range(1, n_sets)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _canonical(provider: peers.Provider, out: torch.Tensor) -> torch.Tensor:
    """A provider's forward output in the canonical layout (Ultralytics' integral is (1, 4, a)
    over rows ordered side-major; ours are (M,) ordered anchor-major)."""
    if provider.prepare is not None and out.dim() == 3:
        return out.reshape(4, -1).t().reshape(-1)
    return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().reshape(-1)
    ref = ref.detach().double().reshape(-1)
    if out.shape != ref.shape:
        return math.nan
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)
    return (out - ref).abs().max().item() / scale if ref.numel() else 0.0


def reference_output(op: str, inputs: Inputs) -> torch.Tensor:
    """The forward of the eager formulas in float64 on one input set: every provider's yardstick.

    The same for both modes (the inputs of a case and dtype do not depend on the mode), so
    ``main`` computes it once per case and dtype."""
    args = tuple(
        a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in inputs.args
    )
    with torch.no_grad():
        return peers.EAGER[op](*args)


def _time_steps(
    steps: dict[str, Callable[[], object]], settings: Settings, rows: dict[str, dict]
) -> dict[str, timing.Timing]:
    """Time the providers' steps; a provider that fails while timed is noted and dropped."""

    def one(name: str, step: Callable[[], object]) -> timing.Timing | None:
        try:
            if settings.device.type == "cuda":
                return timing.bench_cuda(
                    step,
                    warmup_ms=settings.warmup_ms,
                    rep_ms=settings.rep_ms,
                    timer=settings.cuda_timer,
                )
            return timing.bench_cpu(
                {name: step},
                budget_s=settings.budget_s,
                warmup_s=settings.warmup_s,
                min_reps=settings.min_reps,
                min_warmup=1,
            )[name]
        except Exception as exc:  # noqa: BLE001 - reported in the row, the run goes on
            rows[name]["notes"] = f"error while timed: {type(exc).__name__}: {exc}"[:240]
            steps.pop(name, None)
            return None

    if settings.device.type == "cpu" and len(steps) > 1:
        try:
            # interleaved; min_warmup=1: each provider has already made its first call
            return timing.bench_cpu(
                steps,
                budget_s=settings.budget_s,
                warmup_s=settings.warmup_s,
                min_reps=settings.min_reps,
                min_warmup=1,
            )
        except Exception:  # noqa: BLE001 - find the culprit by timing them one at a time
            pass
    results = {name: one(name, step) for name, step in list(steps.items())}
    return {name: t for name, t in results.items() if t is not None}


def bench_case(
    case: Case,
    dtype: torch.dtype,
    mode: str,
    providers: list[peers.Provider],
    settings: Settings,
    copy_bps: float,
    reference_cache: dict | None = None,
) -> list[dict]:
    """Measure every provider on one case; returns one row per provider (metadata excluded).

    ``reference_cache`` keeps the float64 reference output across the modes of a case."""
    device = settings.device
    sets = _rotation_sets(case, dtype, mode, settings)
    reference_out = None
    if settings.check:
        key = (case, dtype)
        if reference_cache is None or key not in reference_cache:
            if reference_cache is not None:
                reference_cache.clear()
            reference_out = reference_output(case.op, sets[0])
            if reference_cache is not None:
                reference_cache[key] = reference_out
        reference_out = reference_cache[key] if reference_cache is not None else reference_out

    rows: dict[str, dict] = {}
    steps: dict[str, Callable[[], object]] = {}
    prepared: dict[str, list[Inputs]] = {}
    for p in providers:
        row = {"provider": p.name, "notes": ""}
        rows[p.name] = row
        try:
            psets = [p.prepare(s) for s in sets] if p.prepare else list(sets)
            prepared[p.name] = psets
            step = make_step(p.fn, psets, mode, settings.inputs)
            _sync(device)
            t0 = time.perf_counter()
            out = step()  # first call, on set 0: compiles for the compile peer
            _sync(device)
            first = time.perf_counter() - t0
            if reference_out is not None:
                row["rel_err_fp64"] = _rel_err(_canonical(p, out), reference_out)
            del out
            if p.compiled:
                t0 = time.perf_counter()
                step()
                _sync(device)
                row["compile_s"] = max(first - (time.perf_counter() - t0), 0.0)
            steps[p.name] = step
        except Exception as exc:  # noqa: BLE001 - a failing provider is reported, not fatal
            row["notes"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            prepared.pop(p.name, None)

    # time
    for name, t in _time_steps(steps, settings, rows).items():
        rows[name].update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)

    # memory: one call each, after the timing (warm caches, compiled code loaded)
    elt = torch.empty((), dtype=dtype).element_size()
    grad_bytes = case.elements * elt
    for name, step in steps.items():
        rows[name]["grad_mb"] = grad_bytes / 2**20
        if not settings.memory:
            continue
        for s in prepared[name]:
            s.pred.grad = None  # freeing an old gradient inside the window would hide a buffer
        gc.collect()
        if hasattr(step, "prepare"):
            step.prepare()  # the fresh pred is the caller's memory, not the step's
        extra = timing.peak_extra_memory(step, device)
        if extra is not None:
            rows[name]["peak_extra_mb"] = extra / 2**20
            rows[name]["extra_per_grad"] = extra / grad_bytes

    # derived columns
    fbytes = cases_mod.floor_bytes(case, dtype, mode)
    floor_ms = fbytes / copy_bps * 1e3
    eager_ms = rows.get("eager", {}).get("median_ms")
    compile_ms = rows.get("compile", {}).get("median_ms")
    for row in rows.values():
        ms = row.get("median_ms")
        row.update(
            op=case.op,
            mode=mode,
            dtype=str(dtype).replace("torch.", ""),
            size=case.size,
            rows=case.rows,
            cols=case.cols,
            elements=case.elements,
            rotating_sets=len(sets),
            floor_bytes=fbytes,
            floor_ms=floor_ms,
            core_target=int(case.core and dtype == torch.float32 and mode == "fwd+bwd"),
        )
        if ms:
            row["speedup_vs_eager"] = eager_ms / ms if eager_ms else None
            row["speedup_vs_compile"] = compile_ms / ms if compile_ms else None
            row["time_over_floor"] = ms / floor_ms
            row["achieved_gbps"] = fbytes / (ms / 1e3) / 1e9
            row["frac_copy_bw"] = floor_ms / ms

    del sets, prepared, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


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
