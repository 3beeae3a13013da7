"""The targets' verdicts: the core issue's CPU targets and issue #6's GPU targets, as tables.

Each case and gfl_ops backend gets a PASS / FAIL (n/a where a number is missing) against the
speed-ups, the fraction of the copy bandwidth and the peak memory its row records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from benchmarks.md_table import _ms, _pct, _table, _x
from benchmarks.result_rows import _f

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
