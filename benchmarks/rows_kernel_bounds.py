"""The rows kernels' (DFL / integral / scale_rows) bandwidth bound on paper, from their SASS.

    python -m benchmarks.rows_kernel_bounds                # the work tree
    python -m benchmarks.rows_kernel_bounds --ref HEAD     # a commit (its csrc/cuda sources)

Compiles csrc/cuda/softmax_rows.cu alone (no ATen; nvcc, sm_90 and sm_80, into a temporary
directory), then for each op, dtype, bin count and launch mode: walks one block of the launcher's
launch through the SASS (benchmarks/sass_path_count.py: lane 0 of each warp, every instruction
counted once, data-dependent branches on the common path), divides the warp-instructions by the
block's elements (x 32: thread issue slots per element), reads registers / stack / local memory
with cuobjdump -res-usage, computes the theoretical occupancy on sm_90 and the bound the issue
rate puts on the bandwidth:

    elements/s <= SMs x 4 schedulers x 32 lanes x clock / slots per element
    bound = min(1, that x bytes per element / copy bandwidth)

with 132 SMs at 1.98 GHz (H100 SXM and H200 boost clock, datasheets) and the copy bandwidths in
BANDWIDTHS.  Prints a markdown table (benchmarks/cuda_rows_kernel.md has the results and the
reading).  Secondary limits it also reports: the MUFU pipe (16 lanes per SM and clock: exp, log,
reciprocal) and the half-rate pipes (64 lanes: integer, compare, select, shift, IMAD).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks import sass_path_count as spc
from benchmarks.cubin_tools import (
    COPY_BANDWIDTH,
    ISSUE,
    compile_cubin,
    materialize,
    nvdisasm_sass,
    occupancy,
    resources,
)

SOURCES = [
    "csrc/gfl_math.h",
    "csrc/cuda/common.cuh",
    "csrc/cuda/launchers.h",
    "csrc/cuda/softmax_rows_kernel.cuh",
    "csrc/cuda/softmax_rows.cu",
]
ROWS_CU = "csrc/cuda/softmax_rows.cu"
BANDWIDTHS = {  # bytes/s: datasheet HBM bandwidth, and the device-to-device copy measured here
    f"{gpu} {kind} {bw[kind] / 1e12}": bw[kind]
    for gpu, bw in COPY_BANDWIDTH.items()
    for kind in ("datasheet", "measured")
}
DTYPES = {"fp32": ("f", 4), "bf16": ("13__nv_bfloat16", 2), "fp16": ("6__half", 2)}
ACC = 4  # opmath bytes of the three
# the bin counts with kernels compiled for them (rows_compiled_count; float opmath)
COMPILED_COUNTS = frozenset(range(2, 18)) | {33}


# ---- the new kernel's geometry (csrc/cuda/softmax_rows_kernel.cuh, rows_geometry)
def rows_geometry(bins: int, acc: int = ACC):
    per16 = 16 // acc
    pitch = bins + per16 if bins % (2 * per16) == 0 else bins
    vec = 1
    while vec * acc < 16 and bins % (2 * vec) == 0:
        vec *= 2
    row_bytes = pitch * acc
    tile = 256
    while tile < 1024 and tile * bins < 2048:
        tile *= 2
    while tile > 32 and tile * row_bytes > 32 * 1024:
        tile //= 2
    if acc == 4 and bins in COMPILED_COUNTS and vec == 1:  # TileRow's kPhased
        rpt = 12 if tile > 256 else 4
        tile = 64 * rpt if tile > 256 else tile
    else:
        rpt = tile // 64 if tile >= 64 else 1
    return pitch, vec, tile, rpt, tile // rpt, tile * row_bytes


def bytes_per_element(op: str, mode: str, s: int, bins: int) -> float:
    n = bins
    if op == "integral":
        return {"fwd": s + s / n, "fused": 2 * s + s / n, "bwd": 2 * s + ACC / n}[mode]
    if op == "dfl":
        return {"fwd": s + 2 * ACC / n, "fused": 2 * s + 2 * ACC / n, "bwd": 2 * s + 2 * ACC / n}[
            mode
        ]
    return 2 * s + ACC / n  # scale_rows over (rows, bins)


def pointers(op: str, mode: str) -> tuple[str, str, str, str]:
    """(target, row_scale, out, grad) parameters of a launch mode."""
    target = "0x7f3000000000" if op == "dfl" else "0"
    out = "0x7f1000000000" if mode in ("fwd", "fused") else "0"
    grad = "0x7f2000000000" if mode in ("fused", "bwd") else "0"
    scale = "0x7f4000000000" if mode == "bwd" else "0"
    return target, scale, out, grad


def walk(kernel: spc.Kernel, block: int, params: str, decide_at: dict[str, bool]):
    c0 = {0x0: block, 0x4: 1, 0x8: 1, 0xC: 1, 0x10: 1, 0x14: 1, 0x28: 0xFFFC00}
    raw = spc.parse_params(params)
    raw += bytes(-len(raw) % 4)
    for off in range(0, len(raw), 4):
        c0[0x210 + off] = int.from_bytes(raw[off : off + 4], "little")
    total, counts = 0, {}
    for w in range(block // 32):
        sregs = {
            "SR_TID.X": 32 * w,
            "SR_TID.Y": 0,
            "SR_TID.Z": 0,
            "SR_CTAID.X": 0,
            "SR_CTAID.Y": 0,
            "SR_CTAID.Z": 0,
            "SR_LANEID": 0,
            "SR_CgaCtaId": 0,
            "SR_SWINHI": 0x10000,
        }
        m = spc.Machine(kernel, c0, sregs, {})
        m.decide_at = decide_at
        m.run()
        total += m.total
        for k, v in m.counts.items():
            counts[k] = counts.get(k, 0) + v
    return total, counts


def half_rate(counts: dict) -> int:
    """Instructions on the 64-lane pipes: the alu class, IMAD, HFMA2/HADD2-free moves."""
    return counts.get("alu", 0) + counts.get("op:IMAD", 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=None, help="a git commit; default: the work tree")
    ap.add_argument("--bins", default="17,8,33")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument(
        "--generic",
        action="store_true",
        help="the runtime-bin-count tile kernel even where the launcher has one "
        "compiled for the bin count",
    )
    ap.add_argument("--ops", default="integral,dfl,scale_rows")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rows_bounds_") as tmp:
        src = materialize(SOURCES, args.ref, Path(tmp))
        sass, res90, decide_at = compiled_sm90(src)
        res80 = resources(compile_cubin(src, ROWS_CU, 80, src / "rows_sm80.cubin"))
        new = "softmax_rows_tile_kernel" in sass
        spill = [
            n
            for r in (res90, res80)
            for n, v in r.items()
            if v.get("STACK", 0) or v.get("LOCAL", 0)
        ]
        kind = ("tile" + (", runtime bin count" if args.generic else "")) if new else "warp-per-row"
        print(
            f"# rows kernels of {args.ref or 'the work tree'} ({kind} kernels); sm_90/sm_80 "
            f"kernels with stack or local memory: {spill or 'none'}\n"
        )
        cols = list(BANDWIDTHS)
        print(
            "| op | dtype | bins | mode | B/elem | slots/elem | MUFU/elem | half-rate/elem | "
            "regs | smem/block | block | blocks/SM, occupancy | "
            + " | ".join(f"bound {c}" for c in cols)
            + " |"
        )
        print("|" + "---|" * (12 + len(cols)))
        for bins in [int(b) for b in args.bins.split(",")]:
            for dname in args.dtypes.split(","):
                mangled, s = DTYPES[dname]
                for op in args.ops.split(","):
                    modes = ("fwd", "fused", "bwd") if op != "scale_rows" else ("in place",)
                    for mode in modes:
                        row = measure(
                            op,
                            mode,
                            dname,
                            mangled,
                            s,
                            bins,
                            new,
                            sass,
                            res90,
                            decide_at,
                            args.generic,
                        )
                        if row is None:
                            continue
                        slots, mufu, half, regs, smem, block, occ = row
                        bpe = bytes_per_element(op, mode, s, bins)
                        bounds = [min(1.0, ISSUE / slots * bpe / bw) for bw in BANDWIDTHS.values()]
                        print(
                            f"| {op} | {dname} | {bins} | {mode} | {bpe:.2f} | {slots:.1f} | "
                            f"{mufu:.2f} | {half:.1f} | {regs} | {smem} | {block} | {occ} | "
                            + " | ".join(f"{b:.0%}" for b in bounds)
                            + " |"
                        )
    return 0


def compiled_sm90(src: Path) -> tuple[str, dict, dict[str, bool]]:
    """softmax_rows.cu of the source tree ``src`` compiled for sm_90: its SASS, its kernels'
    resources and the walk's decision for DFL's NaN-target branch (never taken)."""
    cubin = compile_cubin(src, ROWS_CU, 90, src / "rows_sm90.cubin")
    math_h = (src / "csrc/gfl_math.h").read_text().splitlines()
    nan_line = next(i + 1 for i, text in enumerate(math_h) if "if (y != y)" in text)
    return nvdisasm_sass(cubin), resources(cubin), {f"gfl_math.h:{nan_line}": False}


def measure(op, mode, dname, mangled, s, bins, new, sass, res, decide_at, generic=False):
    if op == "scale_rows":
        name = f"_ZN3gfl4cuda17scale_rows_kernelI{mangled}E"
        per_thread = 8 * 16 // s if new else 1  # the launcher's elements per thread
        block, rows = 256, 256 * per_thread // bins + 1
        total_elems = rows * bins
        params = (
            f"ptr:0x7f2000000000,ptr:0x7f4000000000,i64:1,ptr:0x7f2000000000,i64:{rows},i64:{bins}"
        )
        smem = 0
        elems = min(total_elems, 256 * per_thread)
    elif new:
        pitch, vec, tile, rpt, block, smem = rows_geometry(bins)
        # the launcher's choice (with_rows_tile_kernel): a compile-time count, else the
        # runtime-count kernel
        fixed = not generic and bins in COMPILED_COUNTS and (vec > 1 or rpt % 4 == 0)
        kb = bins if fixed else 0
        name = (
            f"_ZN3gfl4cuda24softmax_rows_tile_kernelI{mangled}Lb{int(op == 'dfl')}ELi{kb}ELi{vec}E"
        )
        target, scale, out, grad = pointers(op, mode)
        params = (
            f"ptr:0x7f0000000000,ptr:{target},ptr:{scale},i64:1,ptr:{out},ptr:{grad},"
            f"i64:{tile},i32:{bins},i32:{pitch},i32:{rpt}"
        )
        elems = tile * bins
    else:
        tpr = 8 if bins <= 8 else (16 if bins <= 16 else 32)
        name = f"_ZN3gfl4cuda19softmax_rows_kernelI{mangled}Li{tpr}ELb{int(op == 'dfl')}E"
        target, scale, out, grad = pointers(op, mode)
        block, smem = 256, 0
        m = 256 // tpr
        params = (
            f"ptr:0x7f0000000000,ptr:{target},ptr:{scale},i64:1,ptr:{out},ptr:{grad},"
            f"i64:{m},i64:{bins}"
        )
        elems = m * bins
    kernel = spc.parse(sass, name)
    total, counts = walk(kernel, block, params, decide_at)
    slots = total * 32 / elems
    mufu = counts.get("mufu", 0) * 32 / elems
    half = half_rate(counts) * 32 / elems
    regs = res[kernel.name]["REG"]
    blocks, occ = occupancy(regs, block, smem)
    return slots, mufu, half, regs, smem, block, f"{blocks}, {occ:.0%}"


if __name__ == "__main__":
    sys.exit(main())
