"""Generate the plots and ``summary.md`` from the result CSVs.

    python -m benchmarks.report [--results DIR]

For every device found in ``DIR/*.csv``, the newest row of each (op, provider, mode, dtype,
size) is kept: the CSVs are the history, the summary is the current state.  Rows of the
``quick`` preset are left out when a device has rows of another preset (quick sizes and
repetitions are for smoke tests, not for reading).  Speed-ups are computed within a run (each
row carries its own, against the eager and compile peers measured beside it), so keeping rows
of different runs side by side never divides one run's time by another's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks import csvio
from benchmarks.md_table import _ms, _pct, _table, _x
from benchmarks.plots import plot_op
from benchmarks.result_rows import _OP_TITLES, _f, latest, load_rows
from benchmarks.targets import (  # noqa: F401 - the constants are re-exported from their old home
    CPU_TARGETS,
    GPU_TARGET_FRAC_BW,
    GPU_TARGET_ROWS,
    GPU_TARGET_VS_COMPILE,
    GPU_TARGET_VS_EAGER,
    MEM_SLACK_BYTES_PER_ROW,
    cpu_targets,
    gpu_targets,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUMMARY = "summary.md"


# --------------------------------------------------------------------------------------------
# markdown


def _runs_table(rows: Sequence[dict[str, str]]) -> list[str]:
    runs: dict[str, dict[str, str]] = {}
    for r in rows:
        runs.setdefault(r["run_id"], r)
    body = [
        (
            r["run_id"],
            r["preset"],
            r["date_utc"],
            f"`{r['git_commit'][:10]}`" + (" (dirty)" if r["git_dirty"] == "yes" else ""),
            r["torch"],
            r["triton"],
            r["cpu_threads"],
            r["copy_gbps"],
            r.get("inputs") or "reused",
        )
        for r in sorted(runs.values(), key=lambda r: r["run_id"])
    ]
    return _table(
        (
            "run",
            "preset",
            "date (UTC)",
            "commit",
            "torch",
            "triton",
            "CPU threads",
            "copy GB/s",
            "inputs",
        ),
        body,
    )


def op_tables(rows: Sequence[dict[str, str]], op: str) -> list[str]:
    lines: list[str] = []
    rows = [r for r in rows if r["op"] == op]
    for mode in sorted({r["mode"] for r in rows}, key=lambda m: (m != "fwd+bwd", m)):
        for dtype in sorted({r["dtype"] for r in rows}, key=lambda d: (d != "float32", d)):
            part = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            if not part:
                continue
            body = []
            for r in part:
                spread = f"{_ms(_f(r, 'p20_ms'))}-{_ms(_f(r, 'p80_ms'))}" if r["median_ms"] else "-"
                mem = _f(r, "peak_extra_mb")
                mem_s = "n/a" if mem != mem else (f"{mem:.3g} ({_f(r, 'extra_per_grad'):.2f})")
                note = r["notes"]
                if r["compile_s"]:
                    note = (note + "; " if note else "") + f"compile {_f(r, 'compile_s'):.1f} s"
                body.append(
                    (
                        r["size"],
                        r["provider"],
                        _ms(_f(r, "median_ms")),
                        spread,
                        _x(_f(r, "speedup_vs_eager")),
                        _x(_f(r, "speedup_vs_compile")),
                        _pct(_f(r, "frac_copy_bw")),
                        _ms(_f(r, "floor_ms")),
                        mem_s,
                        f"{_f(r, 'rel_err_fp64'):.1e}" if r["rel_err_fp64"] else "-",
                        note,
                    )
                )
            lines += [f"#### {mode}, {dtype}", ""]
            lines += _table(
                (
                    "size",
                    "provider",
                    "median ms",
                    "p20-p80 ms",
                    "x eager",
                    "x compile",
                    "% copy BW",
                    "floor ms",
                    "extra MB (/grad)",
                    "rel err",
                    "notes",
                ),
                body,
            )
            lines.append("")
    return lines


def e2e_section(results_dir: Path) -> list[str]:
    path = results_dir / csvio.E2E_CSV
    if not path.exists():
        return []
    rows = csvio.read_rows(path)
    newest: dict[tuple, dict[str, str]] = {}
    for r in rows:
        key = (r["device_name"], r["losses"], r["dtype"], r["batch"], r["image"])
        if key not in newest or r["run_id"] >= newest[key]["run_id"]:
            newest[key] = r
    body = [
        (
            r["device_name"],
            r["losses"],
            r["dtype"],
            f"{r['batch']} x {r['image']}",
            r["anchors"],
            r["positives"],
            _ms(_f(r, "assign_ms")),
            _ms(_f(r, "loss_ms")),
            _ms(_f(r, "step_ms")),
            _pct(_f(r, "loss_share")),
            _x(_f(r, "loss_speedup")),
            r["model"],
            f"`{r['git_commit'][:10]}` {r['date_utc']}",
        )
        for r in sorted(newest.values(), key=lambda r: (r["device_name"], r["losses"]))
    ]
    return (
        [
            "## End to end: the GFL head's loss step",
            "",
            "One training step of the GFL-R50 head's losses (`detector.losses.DetectionLoss`: "
            "QFL over every anchor; integral decode, GIoU and DFL over the positives; "
            "mmdetection's weighting) on a realistic batch.  `assign ms`: ATSS assignment alone "
            "(the same code for every row); `loss ms`: forward+backward of the losses with the "
            "assignment precomputed; `step ms`: the whole training step (backbone, FPN, head, "
            "assignment, losses, backward) with those losses; `loss share` = loss ms / step "
            "ms.  Produced by `python -m benchmarks.e2e_loss_step`.",
            "",
        ]
        + _table(
            (
                "device",
                "losses",
                "dtype",
                "batch",
                "anchors",
                "positives",
                "assign ms",
                "loss ms (fwd+bwd)",
                "step ms",
                "loss share",
                "x vs reference losses",
                "model",
                "commit, date",
            ),
            body,
        )
        + [""]
    )


def summary_markdown(
    by_device: dict[str, list[dict[str, str]]], plots: dict[tuple, Path], results_dir: Path
) -> str:
    lines = [
        "# gfl_ops benchmark results",
        "",
        "Generated by `python -m benchmarks.report` from the CSV files in this folder (do not "
        "edit by hand).  For each device, the newest measurement of every case; each row's "
        "speed-ups are against the eager and compile peers measured in the same run.  "
        "Column meanings and method: [benchmarks/README.md](../README.md).",
        "",
    ]
    if not by_device:
        lines += [
            "No microbenchmark results yet: run `python -m benchmarks.run` (see the README).",
            "",
        ]
    for device, rows in by_device.items():
        device_type = rows[0]["device_type"]
        lines += [f"## {device}", "", "Runs:", ""] + _runs_table(rows) + [""]
        if device_type == "cpu":
            lines += ["### Core targets (CPU, float32, forward+backward)", ""]
            lines += cpu_targets(rows) + [""]
        else:
            lines += ["### Targets (forward+backward at the large sizes)", ""]
            lines += gpu_targets(rows) + [""]
        for op in ("qfl", "dfl", "integral"):
            if not any(r["op"] == op for r in rows):
                continue
            lines += [f"### {_OP_TITLES[op]} (`{op}`)", ""]
            plot = plots.get((device, op))
            if plot is not None:
                lines += [f"![{op} speed-up vs size]({plot.name})", ""]
            lines += op_tables(rows, op)
    lines += e2e_section(results_dir)
    return "\n".join(lines).rstrip() + "\n"


def generate(results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Write one PNG per (device, op) and ``summary.md`` into ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    by_device = latest(load_rows(results_dir))
    plots: dict[tuple, Path] = {}
    written: list[Path] = []
    for device, rows in by_device.items():
        stem = f"{rows[0]['device_type']}-{csvio.slug(device.split(' (')[0])}"
        for op in ("qfl", "dfl", "integral"):
            out = plot_op(rows, device, op, results_dir / f"{stem}-{op}.png")
            if out is not None:
                plots[(device, op)] = out
                written.append(out)
    summary = results_dir / SUMMARY
    summary.write_text(summary_markdown(by_device, plots, results_dir), encoding="utf-8")
    written.append(summary)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    ap.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help="folder holding the CSVs (default benchmarks/results)",
    )
    args = ap.parse_args(argv)
    for p in generate(args.results):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
