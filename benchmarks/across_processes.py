"""The same benchmark in several separate processes: min / median / max of what each one saw.

    python -m benchmarks.across_processes [--processes 5] [--device cpu] [run.py options ...]

One process can be lucky or unlucky as a whole (where the allocator placed its buffers, which
pages it had already touched, how its threads landed), so a single run's median hides a spread
that a training user meets (issue #19 measured 3.3x to 12.8x for the same QFL call in three
processes).  This runs ``python -m benchmarks.run`` (default: the core-targets preset, fresh
inputs, providers eager, compile and gfl_ops) N times, one process after the other, appending
to ``<out>/across-processes-<device>.csv``, then writes ``<out>/across-processes-<device>.md``:
per case and provider, the min / median / max over processes of the per-process median time and
of the speed-ups against eager and ``torch.compile`` measured in the same process, with the
issue #19 targets checked on every process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import cases, csvio
from benchmarks.run import RESULTS_DIR

# Issue #19's targets (CPU, float32, fwd+bwd, fresh inputs): (op, size) -> (min x eager in every
# process, min x eager of the median process, min x compile in every process)
TARGETS = {
    ("qfl", "40000x80"): (5.0, 8.0, 2.0),
    ("dfl", "32000x17"): (5.0, 5.0, 2.0),
    ("integral", "160000x17"): (4.0, 4.0, 2.0),
}
# ... "or show with arithmetic (bytes moved, copy bandwidth measured in the same run) that the
# op is at the memory floor": every process at >= this share of copy bandwidth over
# cases.autograd_floor_bytes (the bytes no exact forward + backward can avoid)
AT_FLOOR = 0.9


def autograd_floor_fraction(row: dict[str, str]) -> float | None:
    """Share of the copy bandwidth measured in the row's process that the op reached over the
    bytes of ``cases.autograd_floor_bytes`` (``frac_copy_bw`` counts ``cases.floor_bytes``)."""
    if not row.get("frac_copy_bw"):
        return None
    rows, cols = (int(v) for v in row["size"].split("x"))
    case = cases.Case(row["op"], rows, cols)
    dtype = getattr(torch, row["dtype"])
    ratio = cases.autograd_floor_bytes(case, dtype, row["mode"]) / cases.floor_bytes(
        case, dtype, row["mode"]
    )
    return float(row["frac_copy_bw"]) * ratio


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.across_processes", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite the markdown from the CSV's newest series",
    )
    args, rest = ap.parse_known_args(argv)
    if args.processes < 1:
        ap.error("--processes must be >= 1")
    return args, rest


def _csv_name(device: torch.device) -> str:
    return csvio.csv_path(Path("."), device).name.replace(
        f"{device.type}-", f"across-processes-{device.type}-", 1
    )


def run_processes(args: argparse.Namespace, rest: list[str], csv_path: Path) -> str:
    """Runs the benchmark in ``args.processes`` processes; returns the series' start time, in
    the run_id format (every row of the series has a run_id at or after it)."""
    series = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    defaults = {
        "--preset": "core-targets",
        "--providers": "eager,compile,gfl_ops-cpu" if args.device == "cpu" else None,
    }
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--device",
        args.device,
        "--out",
        str(args.out),
        "--csv",
        csv_path.name,
        "--no-report",
    ]
    for flag, value in defaults.items():
        if value is not None and not any(a == flag or a.startswith(flag + "=") for a in rest):
            cmd += [flag, value]
    cmd += rest
    for i in range(args.processes):
        print(f"# process {i + 1}/{args.processes}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
    return series


def _stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def summarise(rows: list[dict[str, str]], since: str) -> list[str]:
    """Markdown lines: one table row per (op, size, mode, dtype, provider) of the series."""
    rows = [r for r in rows if r["run_id"] >= since and r.get("median_ms")]
    if not rows:
        return ["No rows in this series."]
    runs = sorted({r["run_id"] for r in rows})
    first = rows[0]
    lines = [
        f"Device: {first['device_name']}; torch {first['torch']}; {first['cpu_threads']} CPU "
        f"threads; commit `{first['git_commit'][:10]}`"
        + (" (dirty)" if first["git_dirty"] == "yes" else "")
        + f"; inputs: {first.get('inputs') or 'reused'}; {len(runs)} processes "
        f"({runs[0]} .. {runs[-1]}).",
        "",
        "Each figure below is one process's median; the columns give the min / median / max of "
        "those over the processes.  Speed-ups are against eager and `torch.compile` timed in "
        "the same process.  % copy BW: the bytes an ideal implementation moves "
        "(benchmarks/cases.py `floor_bytes`) over the time, against a large copy measured in the "
        "same process; over the autograd floor (`autograd_floor_bytes`): the same with the pass "
        "that a separate backward cannot avoid (the integral re-reads pred).",
        "",
        "| op | size | mode | dtype | provider | ms min / med / max | x eager min / med / max "
        "| x compile min / med / max | % copy BW (med) | % copy BW over the autograd floor "
        "min / med / max | target | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["size"], r["mode"], r["dtype"], r["provider"])].append(r)

    def fmt(t: tuple[float, float, float], unit: str = "") -> str:
        return " / ".join(f"{v:.3g}{unit}" for v in t)

    for (op, size, mode, dtype, prov), grp in sorted(groups.items()):
        ms = _stats([float(r["median_ms"]) for r in grp])
        se = [float(r["speedup_vs_eager"]) for r in grp if r.get("speedup_vs_eager")]
        sc = [float(r["speedup_vs_compile"]) for r in grp if r.get("speedup_vs_compile")]
        frac = [float(r["frac_copy_bw"]) for r in grp if r.get("frac_copy_bw")]
        target, verdict = "", ""
        goal = TARGETS.get((op, size))
        if (
            goal
            and prov.startswith("gfl_ops")
            and mode == "fwd+bwd"
            and dtype == "float32"
            and se
            and sc
        ):
            every, med, comp = goal
            ok = min(se) >= every and statistics.median(se) >= med and min(sc) >= comp
            floor = [autograd_floor_fraction(r) for r in grp]
            at_floor = all(f is not None and f >= AT_FLOOR for f in floor)
            target = (
                f">= {every:g}x eager every process"
                + (f", {med:g}x median" if med > every else "")
                + f", >= {comp:g}x compile; or >= {AT_FLOOR:.0%} of copy BW over the "
                "autograd floor every process"
            )
            if ok:
                verdict = "**PASS**"
            elif at_floor:
                lo = min(f for f in floor if f is not None)
                verdict = f"**PASS** (at the memory floor: min {lo:.0%})"
            else:
                verdict = "**FAIL**"
        frac_med = f"{100 * statistics.median(frac):.1f}%" if frac else "-"
        floors = [f for f in (autograd_floor_fraction(r) for r in grp) if f is not None]
        floor_col = " / ".join(f"{100 * v:.0f}%" for v in _stats(floors)) if floors else "-"
        lines.append(
            f"| {op} | {size} | {mode} | {dtype} | {prov} | {fmt(ms)} | "
            f"{fmt(_stats(se), 'x') if se else '-'} | "
            f"{fmt(_stats(sc), 'x') if sc else '-'} | {frac_med} | {floor_col} | {target} | "
            f"{verdict} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = _parse(argv)
    device = torch.device(args.device)
    csv_path = args.out / _csv_name(device)
    if args.report_only:
        if not csv_path.exists():
            raise SystemExit(f"--report-only: no {csv_path} yet")
        since = _series_start(csvio.read_rows(csv_path))
    else:
        since = run_processes(args, rest, csv_path)
    md = csv_path.with_suffix(".md")
    title = "# The core targets measured in separate processes"
    cmd = "python -m benchmarks.across_processes " + " ".join(
        [f"--processes {args.processes}", f"--device {args.device}"] + rest
    )
    md.write_text(
        "\n".join(
            [title, "", f"Command: `{cmd}` (see benchmarks/across_processes.py)", ""]
            + summarise(csvio.read_rows(csv_path), since)
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"# wrote {md}")
    return 0


def _series_start(rows: list[dict[str, str]]) -> str:
    """The run_id where the newest series begins: runs less than an hour apart belong to it."""
    ids = sorted({r["run_id"] for r in rows})
    start = ids[-1]
    for prev, cur in zip(reversed(ids[:-1]), reversed(ids)):
        if _seconds(cur) - _seconds(prev) > 3600:
            break
        start = prev
    return start


def _seconds(run_id: str) -> float:
    return time.mktime(time.strptime(run_id[:16], "%Y%m%dT%H%M%SZ"))


if __name__ == "__main__":
    sys.exit(main())
