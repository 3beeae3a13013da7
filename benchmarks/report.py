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
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks import csvio

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUMMARY = "summary.md"

# Targets (issue #2 for the CPU, issue #6 for the GPU).
CPU_TARGETS = {  # op -> (size, min speed-up vs eager, min speed-up vs compile or None)
    "qfl": (("40000x80",), 5.0, 2.0),
    "dfl": (("32000x17", "160000x17"), 3.0, None),
    "integral": (("32000x17", "160000x17"), 3.0, None),
}
GPU_TARGET_FRAC_BW = 0.80
GPU_TARGET_VS_COMPILE = 1.5
GPU_TARGET_VS_EAGER = 5.0
GPU_TARGET_ROWS = 640_000  # "the large sizes": the largest N / M of the grid
MEM_SLACK_BYTES_PER_ROW = 16  # room for a few per-row float32 vectors (per-row loss, ...)

_OP_TITLES = {
    "qfl": "Quality Focal Loss",
    "dfl": "Distribution Focal Loss",
    "integral": "Softmax integral",
}
_PEER_ORDER = ("eager", "compile", "mmdet", "ultralytics")


def _f(row: dict, key: str) -> float:
    """A numeric column, NaN when empty or missing."""
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan


def _provider_rank(name: str) -> tuple[int, str]:
    return (_PEER_ORDER.index(name), name) if name in _PEER_ORDER else (len(_PEER_ORDER), name)


def _size_key(size: str) -> tuple[int, int]:
    r, c = size.split("x")
    return int(r), int(c)


# --------------------------------------------------------------------------------------------
# loading


def load_rows(results_dir: Path) -> list[dict[str, str]]:
    """Every microbenchmark row of the CSVs directly in ``results_dir``."""
    rows: list[dict[str, str]] = []
    for path in sorted(results_dir.glob("*.csv")):
        data = csvio.read_rows(path)
        if data and "provider" in data[0] and "op" in data[0]:
            rows.extend(data)
    return rows


def latest(rows: Iterable[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """device name -> the newest row of each case (quick rows only if nothing else exists)."""
    by_device: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_device[row["device_name"]].append(row)
    result: dict[str, list[dict[str, str]]] = {}
    for device, drows in by_device.items():
        if any(r["preset"] != "quick" for r in drows):
            drows = [r for r in drows if r["preset"] != "quick"]
        newest: dict[tuple, dict[str, str]] = {}
        for r in drows:
            key = (r["op"], r["provider"], r["mode"], r["dtype"], r["size"])
            if key not in newest or r["run_id"] >= newest[key]["run_id"]:
                newest[key] = r
        result[device] = sorted(
            newest.values(),
            key=lambda r: (
                r["op"],
                r["mode"],
                r["dtype"],
                _size_key(r["size"]),
                _provider_rank(r["provider"]),
            ),
        )
    return result


# --------------------------------------------------------------------------------------------
# plots


def plot_op(rows: Sequence[dict[str, str]], device: str, op: str, path: Path) -> Path | None:
    """Speed-up vs eager against problem size, one panel per (mode, dtype).

    Returns None (no plot) when matplotlib is not installed; the tables do not need it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    rows = [r for r in rows if r["op"] == op]
    modes = sorted({r["mode"] for r in rows}, key=lambda m: (m != "fwd+bwd", m))
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: (d != "float32", d))
    if not modes or not dtypes:
        return None
    fig, axes = plt.subplots(
        len(modes),
        len(dtypes),
        squeeze=False,
        sharex=True,
        figsize=(5.2 * len(dtypes), 3.8 * len(modes)),
    )
    providers = sorted(
        {r["provider"] for r in rows if r["provider"] != "eager"}, key=_provider_rank
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            panel = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            for k, prov in enumerate(providers):
                pts = sorted(
                    (
                        (
                            int(r["elements"]),
                            _f(r, "speedup_vs_eager"),
                            r["size"],
                            _f(r, "speedup_vs_compile"),
                        )
                        for r in panel
                        if r["provider"] == prov
                    ),
                    key=lambda p: p[0],
                )
                pts = [p for p in pts if p[1] == p[1]]
                if not pts:
                    continue
                color = colors[k % len(colors)]
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    "o-",
                    color=color,
                    label=f"{prov} / eager",
                    ms=4,
                )
                if prov.startswith("gfl_ops"):
                    vs_c = [p for p in pts if p[3] == p[3]]
                    ax.plot(
                        [p[0] for p in vs_c],
                        [p[3] for p in vs_c],
                        "s--",
                        color=color,
                        label=f"{prov} / compile",
                        ms=3,
                        alpha=0.7,
                    )
                    for x, y, size, _ in pts:
                        ax.annotate(
                            size, (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points"
                        )
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{mode}, {dtype}", fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
            if i == len(modes) - 1:
                ax.set_xlabel("elements (N x C, or M x (n+1))")
            if j == 0:
                ax.set_ylabel("speed-up (higher is better)")
            ax.legend(fontsize=7)
    fig.suptitle(f"{_OP_TITLES.get(op, op)} -- speed-up vs size\n{device}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# markdown


def _ms(v: float) -> str:
    return "-" if v != v else f"{v:.4g}"


def _x(v: float) -> str:
    return "-" if v != v else f"{v:.2f}x"


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}%"


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


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


def _ours(rows: Sequence[dict[str, str]]) -> list[str]:
    return sorted({r["provider"] for r in rows if r["provider"].startswith("gfl_ops")})


def _verdict(ok: Sequence[bool | None]) -> str:
    if any(v is None for v in ok):
        return "n/a"
    return "**PASS**" if all(ok) else "**FAIL**"


def cpu_targets(rows: Sequence[dict[str, str]]) -> list[str]:
    """The core issue's CPU targets (float32, forward+backward), one line per case and backend."""
    idx = {
        (r["op"], r["provider"], r["size"]): r
        for r in rows
        if r["mode"] == "fwd+bwd" and r["dtype"] == "float32"
    }
    body = []
    for op, (sizes, min_eager, min_compile) in CPU_TARGETS.items():
        for size in sizes:
            eager, comp = idx.get((op, "eager", size)), idx.get((op, "compile", size))
            for prov in _ours(rows) or ["(no gfl_ops backend)"]:
                r = idx.get((op, prov, size))
                if r is None and eager is None:
                    continue
                se = _f(r, "speedup_vs_eager") if r else math.nan
                sc = _f(r, "speedup_vs_compile") if r else math.nan
                checks: list[bool | None] = [None if se != se else se >= min_eager]
                if min_compile is not None:
                    checks.append(None if sc != sc else sc >= min_compile)
                target = f">= {min_eager:g}x eager" + (
                    f", >= {min_compile:g}x compile" if min_compile else ""
                )
                body.append(
                    (
                        op,
                        size,
                        prov,
                        _ms(_f(r, "median_ms") if r else math.nan),
                        _ms(_f(eager, "median_ms") if eager else math.nan),
                        _ms(_f(comp, "median_ms") if comp else math.nan),
                        _x(se),
                        _x(sc),
                        target,
                        _verdict(checks),
                    )
                )
    if not body:
        return [
            "No float32 forward+backward rows of the target sizes yet "
            "(`python -m benchmarks.run --device cpu --preset core-targets`)."
        ]
    return _table(
        (
            "op",
            "size",
            "backend",
            "ours ms",
            "eager ms",
            "compile ms",
            "x eager",
            "x compile",
            "target",
            "verdict",
        ),
        body,
    )


def gpu_targets(rows: Sequence[dict[str, str]]) -> list[str]:
    """Issue #6's GPU targets at the large sizes, forward+backward."""
    body = []
    for r in rows:
        if not (
            r["provider"].startswith("gfl_ops")
            and r["mode"] == "fwd+bwd"
            and int(r["rows"]) >= GPU_TARGET_ROWS
        ):
            continue
        frac, sc, se = _f(r, "frac_copy_bw"), _f(r, "speedup_vs_compile"), _f(r, "speedup_vs_eager")
        extra = _f(r, "peak_extra_mb") * 2**20
        allowed = _f(r, "grad_mb") * 2**20 + MEM_SLACK_BYTES_PER_ROW * int(r["rows"])
        checks = [
            None if frac != frac else frac >= GPU_TARGET_FRAC_BW,
            None if sc != sc else sc >= GPU_TARGET_VS_COMPILE,
            None if se != se else se >= GPU_TARGET_VS_EAGER,
            None if extra != extra else extra <= allowed,
        ]
        body.append(
            (
                r["op"],
                r["dtype"],
                r["size"],
                r["provider"],
                _ms(_f(r, "median_ms")),
                _pct(frac),
                _x(sc),
                _x(se),
                _x(_f(r, "extra_per_grad")).replace("x", ""),
                _verdict(checks),
            )
        )
    if not body:
        return ["No gfl_ops forward+backward rows at the large sizes (M or N = 640k) yet."]
    return [
        f"Targets: >= {100 * GPU_TARGET_FRAC_BW:.0f}% of the measured copy bandwidth, "
        f">= {GPU_TARGET_VS_COMPILE:g}x torch.compile(reference), >= {GPU_TARGET_VS_EAGER:g}x "
        f"eager, peak extra memory <= one gradient-sized buffer (+ {MEM_SLACK_BYTES_PER_ROW} "
        "bytes per row for per-row vectors).",
        "",
    ] + _table(
        (
            "op",
            "dtype",
            "size",
            "backend",
            "ms",
            "% copy BW (>= 80%)",
            "x compile (>= 1.5)",
            "x eager (>= 5)",
            "extra / grad (<= 1)",
            "verdict",
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
