"""Every launch mode of the CUDA kernels, timed alone on a GPU beside its bound on paper.

    python -m benchmarks.kernel_sweep paper                 # = benchmarks.paper_bounds (no GPU)
    python -m benchmarks.kernel_sweep run [--budget-s 45]   # on a GPU (make gpu-check runs it)
    python -m benchmarks.kernel_sweep run --dry-run         # the wiring, on a CPU machine

The benchmark preset of ``make gpu-check`` times the sizes detectors use (QFL at 20 / 80 / 365
classes, DFL and the integral at 8 / 17 / 33 bins) against eager and ``torch.compile``.  The
kernels have more launch modes than that, each with its own bandwidth bound on paper
(benchmarks/cuda_rows_kernel.md, benchmarks/cuda_qfl_kernel.md): every bin count 2..64, the
compiled-count and runtime-count rows kernels, QFL on probabilities, beta 0 / 1 / general, the
dense form, each forward, fused (forward writing the gradient) and backward.  This module closes the
loop between paper and GPU:

* ``paper`` (a CPU machine with nvcc; benchmarks/paper_bounds.py): every case's bound counted
  in the sm_90 SASS, into ``benchmarks/results/paper-bounds-sm90.csv``.
* ``run`` (a GPU): times each case of that file with the CUDA operators called directly
  (``torch.ops.gfl_ops.*``, the value checks are not on that path), about 2^25 elements per case
  (64-256 MB, beyond L2), L2 flushed before each repetition, and the device's copy bandwidth
  measured in the same run; writes ``gpu-sweep-<device>.csv`` (every case: time, GB/s, % of
  copy bandwidth, the paper's bound at that bandwidth, measured / paper) and ``.md`` (summary
  per kernel and mode, the cases under the targets -- rows kernels 80%, QFL 60% -- and the cases
  where the GPU falls furthest short of the paper).  The cases run in priority order (the 16-bit
  rows forward at every count, which the paper puts under target at uncommon counts, first)
  until ``--budget-s`` is spent; the report says how many ran.

Bytes per element are the paper's (``rows_kernel_bounds.bytes_per_element``,
``qfl_kernel_bounds.mode_bytes``): pred read, gradient written when there is one, the per-row
target / label / score / row scale / loss over the row's elements.  The backward cases pass a
float32 row scale (the autograd path converts a 16-bit one first: one small extra kernel that
the bytes model does not count).  QFL's labels cases have 2% positive anchors, as a detector's,
and their paper bound counts the positives' label patch at that rate.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.paper_bounds import (
    FIELDS,
    MODES,
    QFL_BETAS,
    QFL_CLASSES,
    QFL_POSITIVES,
    ROOT,
    read_paper,
    sources_sha256,
    write_paper,
)

TARGETS = {"rows": 0.80, "qfl": 0.60}  # issue #18's targets, share of copy bandwidth
ELEMENTS = 1 << 25  # per case on a GPU: 64 MB of bf16 logits, 128 MB of float32
DRY_RUN_ELEMENTS = 1 << 10
# gpu-sweep-<device>.csv: the case, then what was measured
SWEEP_FIELDS = FIELDS[:7] + [
    "elements",
    "us",
    "GBps",
    "pct_copy",
    "paper_pct_copy",
    "measured_over_paper",
    "inflight_bytes_per_sm",
]
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# run: each case timed on the device


def priority(case: dict) -> tuple:
    """Sort key: the cases the paper leaves in doubt first, the repeats of others last."""
    dtype_rank = {"bf16": 0, "fp32": 1, "fp16": 2}[case["dtype"]]
    mode_rank = MODES.index(case["mode"])
    if case["kernel"] == "rows":
        # the 16-bit forward (the tightest on paper: 84-100% of an H200's), then fp32 forward,
        # then the gradient modes; fp16 (bf16's code but for the conversion) last
        band = 0 if (case["mode"] == "fwd" and dtype_rank < 2) else (2 if dtype_rank < 2 else 4)
        return (band, "rows", (dtype_rank, mode_rank, case["op"], int(case["size"])))
    c = int(case["size"])
    band = 1 if (c == 80 and dtype_rank < 2 and case["mode"] != "bwd") else 3
    if dtype_rank == 2:
        band = 4
    return (
        band,
        "qfl",
        (QFL_CLASSES.index(c), dtype_rank, mode_rank, case["op"], case["activated"]),
    )


def _inputs(case: dict, device: torch.device, elements: int, gen: torch.Generator) -> Callable:
    """The call that launches the case's kernel, on fresh inputs of about `elements` elements."""
    ops = torch.ops.gfl_ops
    dtype = TORCH_DTYPES[case["dtype"]]
    size, mode = int(case["size"]), case["mode"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    if case["kernel"] == "rows":
        m = max(1, elements // size)
        pred = (randn(m, size) * 2).to(dtype)
        target = rand(m) * (size - 1)
        scale = rand(m)
        if case["op"] == "integral":
            if mode == "bwd":
                return lambda: ops.integral_backward(scale, pred)
            return lambda: ops.integral(pred, mode == "fused")
        if mode == "bwd":
            return lambda: ops.dfl_backward(scale, pred, target)
        return lambda: ops.dfl(pred, target, mode == "fused")
    n = max(1, elements // size)
    logits = randn(n, size)
    pred = (torch.sigmoid(logits) if case["activated"] == "1" else logits).to(dtype)
    beta = next(b for label, _, b in QFL_BETAS if label == case["beta"])
    activated = case["activated"] == "1"
    positive = rand(n) < QFL_POSITIVES
    labels = torch.where(
        positive,
        torch.randint(0, size, (n,), generator=gen, device=device),
        torch.full((n,), size, device=device),
    )
    scores = rand(n)
    scale = rand(n)
    if case["op"] == "qfl_labels":
        if mode == "bwd":
            return lambda: ops.qfl_backward(scale, pred, labels, scores, beta, activated)
        return lambda: ops.qfl(pred, labels, scores, beta, activated, mode == "fused")
    target = torch.zeros(n, size + 1, device=device)
    target[torch.arange(n, device=device), labels] = scores
    target = target[:, :size].contiguous()  # float32, as detectors pass it (fp32 pred: its dtype)
    if mode == "bwd":
        return lambda: ops.qfl_dense_backward(scale, pred, target, beta, activated)
    return lambda: ops.qfl_dense(pred, target, beta, activated, mode == "fused")


def _median_seconds(fn: Callable, device: torch.device) -> float:
    from benchmarks.timing import bench_cpu, bench_cuda

    if device.type == "cuda":
        timing = bench_cuda(fn, warmup_ms=2.0, rep_ms=10.0, min_reps=5, max_reps=100)
    else:  # the dry run's wiring: a few calls
        timing = bench_cpu({"case": fn}, budget_s=0.01, warmup_s=0.0, min_reps=3)["case"]
    return timing.median_ms / 1e3


def run_sweep(
    device: torch.device, out_dir: Path, budget_s: float, dry_run: bool, device_name: str
) -> tuple[Path, Path, str]:
    """Times the paper's cases on ``device`` until ``budget_s`` is spent; returns the CSV, the
    report and the one-line outcome benchmarks/gpu_check.py shows in its steps table."""
    import gfl_ops  # noqa: F401  (loads the extension: torch.ops.gfl_ops)
    from benchmarks import csvio
    from benchmarks.timing import copy_bandwidth

    started = time.perf_counter()
    paper = read_paper()
    current = sources_sha256()
    stale = paper[0]["sources_sha256"] != current
    cases = sorted(paper, key=priority)
    if dry_run:  # the wiring: one case per kernel, op and mode, at tiny sizes on the CPU
        seen, picked = set(), []
        for c in cases:
            key = (c["kernel"], c["op"], c["mode"])
            if key not in seen:
                seen.add(key)
                picked.append(c)
        cases = picked
    elements = DRY_RUN_ELEMENTS if dry_run else ELEMENTS
    copy_bw = copy_bandwidth(device, nbytes=(1 << 20) if dry_run else None, budget_s=0.05)
    # the paper counts 132 SMs (H100 SXM, H200) at 1.98 GHz: scale by this device's SMs
    sms = torch.cuda.get_device_properties(device).multi_processor_count if not dry_run else 132
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    slug = csvio.slug(device_name.split(" (")[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"gpu-sweep-{slug}.csv", out_dir / f"gpu-sweep-{slug}.md"
    # each row written as it is measured: a run stopped from outside keeps what it timed
    csv_file = open(csv_path, "w", newline="")  # noqa: SIM115 - closed below, after the loop
    writer = csv.DictWriter(csv_file, fieldnames=SWEEP_FIELDS)
    writer.writeheader()
    results, errors = [], []
    for case in cases:
        if time.perf_counter() - started > budget_s:
            break
        try:
            fn = _inputs(case, device, elements, gen)
            seconds = _median_seconds(fn, device)
        except Exception as exc:  # noqa: BLE001 - reported; one failing case must not stop the rest
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            errors.append(
                {**{k: case[k] for k in FIELDS[:7]}, "error": f"{type(exc).__name__}: {first}"}
            )
            if device.type == "cuda" and "CUDA" in str(exc):
                break  # the CUDA context may be unusable after a device-side error
            continue
        size = int(case["size"])
        n_elem = max(1, elements // size) * size
        bpe = float(case["bytes_per_elem"])
        achieved = bpe * n_elem / seconds
        predicted = min(1.0, float(case["issue_bound_GBps"]) * 1e9 * sms / 132 / copy_bw)
        results.append(
            {
                **{k: case[k] for k in FIELDS[:7]},
                "elements": n_elem,
                "us": f"{seconds * 1e6:.2f}",
                "GBps": f"{achieved / 1e9:.1f}",
                "pct_copy": f"{achieved / copy_bw:.4f}",
                "paper_pct_copy": f"{predicted:.4f}",
                "measured_over_paper": f"{achieved / copy_bw / predicted:.3f}",
                "inflight_bytes_per_sm": case["inflight_bytes_per_sm"],
            }
        )
        writer.writerow(results[-1])
        csv_file.flush()
        del fn
    csv_file.close()
    seconds_used = time.perf_counter() - started
    md_path.write_text(
        _report(
            results,
            total=len(cases),
            errors=errors,
            device=device,
            device_name=device_name,
            copy_bw=copy_bw,
            sms=sms,
            seconds=seconds_used,
            stale=stale,
            paper_commit=paper[0]["commit"],
            dry_run=dry_run,
        ),
        encoding="utf-8",
    )
    under = sum(float(r["pct_copy"]) < TARGETS[r["kernel"]] for r in results)
    summary = (
        f"{len(results)} of {len(cases)} cases in {seconds_used:.0f} s; under target (rows "
        f"{_pct(TARGETS['rows'])}, QFL {_pct(TARGETS['qfl'])}): {under} of {len(results)}; "
        f"errors: {len(errors)}"
    )
    return csv_path, md_path, summary


def _versions(device: torch.device) -> str:
    from benchmarks.csvio import run_metadata

    meta = run_metadata(device, "kernel-sweep")
    return (
        f"torch {meta['torch']} (CUDA {meta['cuda']}), Triton {meta['triton']}, "
        f"commit {meta['git_commit'][:7]}{' (dirty tree)' if meta['git_dirty'] == 'yes' else ''}"
    )


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _report(
    results,
    *,
    total,
    errors,
    device,
    device_name,
    copy_bw,
    sms,
    seconds,
    stale,
    paper_commit,
    dry_run,
):
    lines = [
        f"# Kernel sweep: {device_name}{' (dry run on a CPU machine)' if dry_run else ''}",
        "",
        f"{_versions(device)}; copy bandwidth measured in this run {copy_bw / 1e9:.0f} GB/s "
        f"(read + written). {len(results)} of {total} cases in {seconds:.0f} s "
        "(`python -m benchmarks.kernel_sweep run`; priority order, see its docstring). Paper "
        f"bounds: benchmarks/results/paper-bounds-sm90.csv (commit {paper_commit}"
        + (
            "; **the CUDA sources have changed since: regenerate it**)."
            if stale
            else ", the sources timed here)."
        ),
        "",
        "Measured = bytes moved per element (the paper's model) x elements / median time, as "
        "% of the copy bandwidth; paper = the issue-rate bound from the sm_90 SASS at that copy "
        f"bandwidth ({sms} SMs, clock taken as 1.98 GHz, the H100 SXM / H200 boost clock). "
        "Loads in flight / SM (rows kernels): the 16-byte loads every resident block's threads "
        "issue at once when they stage a tile; a SM must keep about copy bandwidth x latency / "
        "SMs in flight (Little's law), so where measured falls short of the paper and that "
        "figure is small, latency rather than issue is the limit.",
        "",
        "## By kernel and mode: % of copy bandwidth over the cases timed (min / median / max)",
        "",
        "| kernel | op | mode | dtype | cases | measured | paper "
        "| measured / paper (min, median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["kernel"], r["op"], r["mode"], r["dtype"]), []).append(r)
    for (kernel, op, mode, dtype), rs in sorted(groups.items()):
        m = sorted(float(r["pct_copy"]) for r in rs)
        p = sorted(float(r["paper_pct_copy"]) for r in rs)
        q = sorted(float(r["measured_over_paper"]) for r in rs)
        lines.append(
            f"| {kernel} | {op} | {mode} | {dtype} | {len(rs)} | {_pct(m[0])} / "
            f"{_pct(statistics.median(m))} / {_pct(m[-1])} | {_pct(p[0])} / "
            f"{_pct(statistics.median(p))} / {_pct(p[-1])} | {q[0]:.2f}, "
            f"{statistics.median(q):.2f} |"
        )
    under = [r for r in results if float(r["pct_copy"]) < TARGETS[r["kernel"]]]
    lines += [
        "",
        f"## Under target (rows {_pct(TARGETS['rows'])}, QFL {_pct(TARGETS['qfl'])}): "
        f"{len(under)} of {len(results)}",
        "",
        _case_table(sorted(under, key=lambda r: float(r["pct_copy"]))[:40]),
        "",
        "## Furthest below the paper (measured / paper, lowest 20)",
        "",
        _case_table(sorted(results, key=lambda r: float(r["measured_over_paper"]))[:20]),
        "",
        f"## Errors: {len(errors)}",
        "",
        *(
            f"- {e['op']} {e['mode']} {e['dtype']} {e['size']} activated={e['activated']} "
            f"beta={e['beta']}: {e['error']}"
            for e in errors
        ),
        "",
    ]
    return "\n".join(lines)


def _case_table(rows: list[dict]) -> str:
    out = [
        "| kernel | op | mode | dtype | bins / classes | activated | beta | us | measured | "
        "paper | loads in flight / SM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flight = r["inflight_bytes_per_sm"]
        out.append(
            f"| {r['kernel']} | {r['op']} | {r['mode']} | {r['dtype']} | {r['size']} | "
            f"{r['activated']} | {r['beta']} | {r['us']} | {_pct(float(r['pct_copy']))} | "
            f"{_pct(float(r['paper_pct_copy']))} | "
            f"{f'{int(flight) / 1024:.0f} KB' if flight else ''} |"
        )
    return "\n".join(out) if rows else "(none)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_sweep", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("paper", help="count every case's bound in the SASS (no GPU; nvcc)")
    run = sub.add_parser("run", help="time every case on the GPU")
    run.add_argument("--budget-s", type=float, default=45.0, help="stop starting cases after")
    run.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    run.add_argument("--dry-run", action="store_true", help="a CPU machine: the wiring only")
    args = ap.parse_args(argv)
    if args.cmd == "paper":
        return write_paper()
    if not args.dry_run and not torch.cuda.is_available():
        print("kernel_sweep run: no CUDA device here (use --dry-run)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "cpu" if args.dry_run else torch.cuda.get_device_name()
    csv_path, md_path, summary = run_sweep(device, args.out, args.budget_s, args.dry_run, name)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {csv_path} and {md_path}")
    print(f"sweep: {summary}")  # the line benchmarks/gpu_check.py shows in its steps table
    return 0 if summary.endswith("errors: 0") else 1


if __name__ == "__main__":
    sys.exit(main())
