"""The report of ``make gpu-check`` (benchmarks/gpu_check.py): ``gpu-<device>.{csv,md}`` with every
step's outcome, the operator benchmark's table and the frameworks' and the sweep's summaries,
rewritten after every step and copied to ``$OUT`` (the device tool's return folder)."""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import time
from pathlib import Path

from benchmarks.gpu_check_steps import Step


def embedded_report(out_dir: Path, pattern: str, missing: str) -> list[str]:
    """The body of a step's own report (the first ``pattern`` match in ``out_dir``), its title
    dropped and its sections one level down, or ``missing`` when the step wrote none."""
    reports = sorted(out_dir.glob(pattern))
    if not reports:
        return ["", missing]
    body = reports[0].read_text(encoding="utf-8").splitlines()[1:]
    return [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body]


def bench_table(csv_file: Path) -> list[str]:
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


def publish_report(
    args: argparse.Namespace,
    info: dict[str, str],
    steps: dict[str, Step],
    bench_dir: Path,
    return_dir: Path,
    total_s: float,
) -> tuple[Path, Path]:
    """Writes the report (and the sweep's files) to args.out, copies them and the steps' logs to
    $OUT when that is a folder (the device tool's return folder)."""
    csv_out, md_out = write_report(
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


def write_report(
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
        *bench_table(bench_csv),
        "",
        "## In the frameworks (benchmarks.e2e_frameworks: one training step, stock vs fused)",
        *embedded_report(return_dir, "e2e-frameworks-*.md", "(not run: see its step above)"),
        "",
        "## Kernel sweep (benchmarks.kernel_sweep: each launch mode alone, against the paper)",
        *embedded_report(return_dir, "gpu-sweep-*.md", "(not run: see its step above)"),
        "",
    ]
    md_out.write_text("\n".join(lines), encoding="utf-8")
    return csv_out, md_out
