"""The QFL CUDA kernel's instruction counts and bandwidth bound on paper, from its SASS.

    python -m benchmarks.qfl_kernel_bounds --before d4c2f8e      # before: that commit's sources
    python -m benchmarks.qfl_kernel_bounds --before d4c2f8e --classes 20 --arch 80

Compiles csrc/cuda/qfl.cu alone (no ATen: nvcc with torch's half / bfloat16 flags, into a
temporary directory) from the work tree (after) and from the sources of a commit (before),
disassembles them (cuobjdump -sass; nvdisasm from Triton's bundle when the CUDA toolkit has
none) and counts, per kernel, the SASS instructions of one element on the element loop's common
path:

* the element loop is the innermost loop (closed by a backward BRA) with the most instructions on
  its path, among those with MUFU work for logits;
* its common path runs from the loop head to the back edge; unconditional forward branches are
  followed; a predicated forward branch is decided by what set its predicate: a comparison of the
  runtime `mode` / `activated` kernel parameters (the before kernel) by the case counted, FCHK
  (division special case) false, the reciprocal fast-path test true, any other data test (inf /
  NaN / subnormal fix-ups, the unrolled loop's odd-count exit) false;
* every instruction on the path counts one issue slot (predicated-off ones too);
* per element = path / elements per iteration (1 before; 16 bytes / element size x the words
  of pred loaded in the iteration, after);
* the per-row work of a lane: the row loop's common path minus the element loops it passes
  through (label / score / scale loads, the row split, the shuffle reduction, the loss store).

Effective slots per element for C classes and L lanes per row: (each lane's element work + its
row work) x L / C, the idle lanes of a row's last round included: before, C elements of the loop
over L = 32 lanes (the old qfl_lanes_per_row); after, C // W words and C % W scalars (head and
tail; rows taken 16-byte aligned) over the launcher's L.  The bound: elements/s <=
min(issue, MUFU) with issue = SMs x 4 x 32 x clock slots/s and MUFU = SMs x 16 x clock
lane-operations/s; bound = that x bytes per element / copy bandwidth.  132 SMs at 1.98 GHz
(H100 SXM and H200 boost clock), copy bandwidths in BANDWIDTHS.
Registers from cuobjdump -res-usage; occupancy with cuda_occupancy.h's rules (registers per warp
rounded up to 256, 16384 per sub-partition, at most 64 warps and 32 blocks per SM) at the
launcher's block of 256.  Results and their reading: benchmarks/cuda_qfl_kernel.md.

The parts: benchmarks/cubin_tools.py compiles and reads the cubins (and holds the GPU figures),
benchmarks/qfl_sass_paths.py finds the loops and walks their common paths, and this module
counts the cases and prints the tables.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

from benchmarks.cubin_tools import (
    CLOCK_HZ,
    COPY_BANDWIDTH,
    ISSUE,
    MUFU,
    ROOT,
    SMS,
    compile_cubin,
    cuobjdump_sass,
    demangle,
    materialize,
    occupancy,
    resources,
)
from benchmarks.qfl_sass_paths import element_loops, label_patch, parse, row_work, runtime_env
from benchmarks.sass_path_count import PARAM_BASE

SOURCES = [
    "csrc/gfl_math.h",
    "csrc/cuda/common.cuh",
    "csrc/cuda/launchers.h",
    "csrc/cuda/qfl_kernel.cuh",
    "csrc/cuda/qfl.cu",
]
QFL_CU = "csrc/cuda/qfl.cu"
# gpu -> (measured copy, datasheet) bytes/s
BANDWIDTHS = {gpu: (bw["measured"], bw["datasheet"]) for gpu, bw in COPY_BANDWIDTH.items()}
HALF_FLAGS = (  # torch's half / bfloat16 flags
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)
STORAGE = {
    "fp32": ("float", 4),
    "bf16": ("__nv_bfloat16", 2),
    "fp16": ("__half", 2),
    "fp64": ("double", 8),
}
# the before kernel's `mode` / `activated` parameters: offsets from the parameter base of
# constant bank 0 (by the size of its beta: float or double); that base per arch: PARAM_BASE
BEFORE_MODE = {4: (0x54, 0x58), 8: (0x58, 0x5C)}


# ---------------------------------------------------------------------------------------------
# The cases.


def after_lanes(c: int, size: int) -> int:
    """qfl_kernel.cuh's qfl_lanes_log2, as lanes."""
    width = 16 // size
    words, scalars = c // width, c % width
    lowest = 0 if c * size <= 48 else 1
    cost = {
        s: (1 << s)
        * (
            ((words + (1 << s) - 1) >> s) * width * 30
            + ((scalars + (1 << s) - 1) >> s) * 50
            + 40
            + 2 * s
        )
        for s in range(lowest, 6)
    }
    cheapest = min(cost.values())
    return 1 << max(s for s in cost if cost[s] * 100 <= cheapest * 103)


class Listing:
    def __init__(self, cubin: Path, arch: int):
        self.arch = arch
        self.funcs = parse(cuobjdump_sass(cubin))
        self.names = demangle(list(self.funcs))
        self.regs = {}
        for name, res in resources(cubin).items():
            assert res["STACK"] == 0 and res["LOCAL"] == 0, f"{name} uses stack / local memory"
            self.regs[name] = res["REG"]

    def find(self, prefix: str) -> str:
        hits = [n for n in self.funcs if self.names[n].startswith(prefix)]
        assert len(hits) == 1, (prefix, hits)
        return hits[0]


def before_case(lst: Listing, dtype: str, form: str, c: int, activated=False, mode=2):
    storage, size = STORAGE[dtype]
    target = "float" if form == "dense-opmath" and size == 2 else storage
    lanes = 1 if c <= 2 else (8 if c <= 16 else 32)  # the old qfl_lanes_per_row
    name = lst.find(
        f"void gfl::cuda::qfl_kernel<{storage}, {target}, {lanes}, "
        f"{'false' if form == 'labels' else 'true'}>"
    )
    ins = lst.funcs[name]
    base = PARAM_BASE[lst.arch]
    mode_off, act_off = BEFORE_MODE[max(size, 4)]
    env = runtime_env(ins, base + mode_off, base + act_off, mode, activated)
    path = element_loops(ins, env, need_mufu=not activated)[0][2]
    loop = len(path)
    return {
        "loop": loop,
        "mufu": sum("MUFU" in t for t in path),
        "row": row_work(ins, env),
        "lanes": lanes,
        "regs": lst.regs[name],
        "lane_work": loop * lanes * math.ceil(c / lanes),
        "lane_mufu": sum("MUFU" in t for t in path) * lanes * math.ceil(c / lanes),
    }


def after_case(lst: Listing, dtype: str, form: str, c: int, grad: bool, activated=False, beta=2):
    storage, size = STORAGE[dtype]
    target = "float" if form == "dense-opmath" and size == 2 else storage
    name = lst.find(
        f"void gfl::cuda::qfl_kernel<{storage}, {target}, "
        f"{'false' if form == 'labels' else 'true'}, "
        f"{'true' if activated else 'false'}, {beta}, "
        f"{'true' if grad else 'false'}, int>"
    )
    ins = lst.funcs[name]
    width = 16 // size if size < 8 else 1
    labels = form == "labels"
    env = runtime_env(ins, -1, -1, beta, activated, word=width if labels else None, labels=labels)
    (_, _, path), *rest = element_loops(ins, env, need_mufu=not activated)
    tsize = {"labels": 0, "dense": size, "dense-opmath": 4 if size == 2 else size}[form]
    if width > 1:
        words = sum(bool(re.search(r"\bLDG\.E\.128", t)) for t in path) / (1 + tsize * width // 16)
    else:
        words = sum(bool(re.search(r"\bLDG", t)) for t in path) / (2 if tsize else 1)
    elems = words * width
    lanes = after_lanes(c, size)
    # a row of 16-byte aligned rows: c // width words, c % width scalars (head + tail)
    row_words, scalars = c // width, c % width
    scalar = rest[0][2] if rest and scalars else []
    lane_work = len(path) / elems * width * lanes * math.ceil(row_words / lanes) + len(
        scalar
    ) * lanes * math.ceil(scalars / lanes)
    mufu = sum("MUFU" in t for t in path) / elems
    lane_mufu = mufu * width * lanes * math.ceil(row_words / lanes) + sum(
        "MUFU" in t for t in scalar
    ) * lanes * math.ceil(scalars / lanes)
    return {
        "loop": len(path) / elems,
        "mufu": mufu,
        "scalar": len(scalar),
        "row": row_work(ins, env),
        "lanes": lanes,
        "regs": lst.regs[name],
        "lane_work": lane_work,
        "lane_mufu": lane_mufu,
        "patch": label_patch(ins, width) if form == "labels" and width > 1 else 0,
    }


MODES = {  # mode -> (form, gradient written, bytes per row besides pred / target / gradient)
    "labels fwd": ("labels", False, 8 + 4 + 4),  # label, score read; loss written
    "labels fused": ("labels", True, 8 + 4 + 4),
    "labels bwd": ("labels", True, 8 + 4 + 4),  # label, score, row scale read
    "dense fwd": ("dense", False, 4),  # loss written
    "dense fused": ("dense", True, 4),
    "dense bwd": ("dense", True, 4),  # row scale read
}


def element_rate(k: dict, c: int) -> tuple[float, float, float]:
    """(issue slots per element with idle lanes and row work, MUFU per element, elements per
    second that the issue rate and the MUFU rate allow) of an after_case / before_case result."""
    eff = (k["lane_work"] + k["row"] * k["lanes"]) / c
    mufu = k["lane_mufu"] / c
    return eff, mufu, min(ISSUE / eff, MUFU / mufu) if mufu else ISSUE / eff


def mode_bytes(form: str, grad: bool, size: int, c: int) -> float:
    """Bytes per element of a launch: pred, the dense target (float32, as detectors pass it
    with 16-bit pred), the gradient when written, and the per-row reads and writes over c."""
    per_row = MODES[f"{form} {'fused' if grad else 'fwd'}"][2]
    tsize = 0 if form == "labels" else 4
    return size + tsize + (size if grad else 0) + per_row / c


def table(before: Listing, after: Listing, c: int) -> list[dict]:
    rows = []
    for mode, (form, grad, _) in MODES.items():
        for dtype in ("fp32", "bf16", "fp16"):
            size = STORAGE[dtype][1]
            # dense targets in float32, as the benchmarks (and detectors) pass them
            f = "dense-opmath" if form == "dense" and size == 2 else form
            b = before_case(before, dtype, f, c)
            a = after_case(after, dtype, f, c, grad)
            nbytes = mode_bytes(form, grad, size, c)
            r = {"mode": mode, "dtype": dtype, "bytes": nbytes}
            for key, k in (("b", b), ("a", a)):
                eff, mufu, rate = element_rate(k, c)
                r.update(
                    {
                        f"{key}_loop": k["loop"],
                        f"{key}_eff": eff,
                        f"{key}_mufu": mufu,
                        f"{key}_row": k["row"],
                        f"{key}_lanes": k["lanes"],
                        f"{key}_regs": k["regs"],
                        f"{key}_occ": occupancy(k["regs"], 256)[1],
                    }
                )
                for gpu, (measured, sheet) in BANDWIDTHS.items():
                    r[f"{key}_{gpu}"] = (rate * nbytes / measured, rate * nbytes / sheet)
            if form == "labels":
                # a positive row's label word: its lane alone runs the patch, patch x 32 thread
                # slots spread over the row's c elements (whatever the lanes per row)
                r["patch"] = a["patch"]
                r["per_pct"] = a["patch"] * 32 * 0.01 / c
                eff2 = r["a_eff"] + 2 * r["per_pct"]
                rate2 = min(ISSUE / eff2, MUFU / r["a_mufu"])
                r["at2"] = {g: rate2 * nbytes / m for g, (m, _) in BANDWIDTHS.items()}
            rows.append(r)
    return rows


def _pct(x: float) -> str:
    # over 100%: memory-bound by this arithmetic, with that much issue headroom
    return f"{x * 100:.0f}%"


def print_tables(rows: list[dict], c: int) -> None:
    print(
        f"C = {c} classes; issue {ISSUE / 1e12:.2f}e12 slots/s, MUFU {MUFU / 1e12:.2f}e12/s "
        f"({SMS} SMs, {CLOCK_HZ / 1e9:.2f} GHz)\n"
    )
    print(
        "| mode | dtype | bytes/elem | loop SASS/elem | + idle lanes, row work | MUFU/elem "
        "| row work/lane (lanes) | regs | occupancy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['dtype']} | {r['bytes']:.2f} | {r['b_loop']:.0f} -> "
            f"{r['a_loop']:.1f} | {r['b_eff']:.0f} -> {r['a_eff']:.1f} | {r['b_mufu']:.1f} -> "
            f"{r['a_mufu']:.1f} | {r['b_row']} ({r['b_lanes']}) -> {r['a_row']} "
            f"({r['a_lanes']}) | {r['b_regs']} -> {r['a_regs']} | {r['b_occ'] * 100:.0f}% -> "
            f"{r['a_occ'] * 100:.0f}% |"
        )
    print(
        "\nBound by the issue rate (and MUFU) as % of copy bandwidth, against the measured "
        "(datasheet) bandwidth; over 100%: memory-bound, with that much headroom\n"
    )
    print("| mode | dtype | H100 before | H100 after | H200 before | H200 after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{_pct(r[f'{k}_{g}'][0])} ({_pct(r[f'{k}_{g}'][1])})"
            for g in ("H100", "H200")
            for k in ("b", "a")
        ]
        print(f"| {r['mode']} | {r['dtype']} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    print(
        "\nPositive anchors (labels form, after): the label's word runs one general element in "
        "its lane alone\n"
    )
    print(
        "| mode | dtype | patch (warp instr) | + slots/elem per 1% positives | at 2%: H100 | H200 |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "patch" in r:
            print(
                f"| {r['mode']} | {r['dtype']} | {r['patch']} | {r['per_pct']:.3f} | "
                f"{_pct(r['at2']['H100'])} | {_pct(r['at2']['H200'])} |"
            )


def print_modes(after: Listing, c: int) -> None:
    """Every compiled mode of the after kernel (fp32 and bf16): loop SASS per element (MUFU),
    and the bound it gives as % of H100 / H200's measured copy bandwidth, as in the tables
    above (idle lanes and row work counted; no positives)."""
    print(
        "\n| form | activated | beta | dtype | fwd SASS/elem (MUFU) | with gradient (MUFU) "
        "| fwd: H100, H200 | with gradient: H100, H200 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for form in ("labels", "dense"):
        for activated in (False, True):
            for beta, label in ((2, "2"), (0, "0"), (1, "1"), (3, "general")):
                for dtype in ("fp32", "bf16"):
                    size = STORAGE[dtype][1]
                    f = "dense-opmath" if form == "dense" and dtype == "bf16" else form
                    cells, bounds = [], []
                    for grad in (False, True):
                        k = after_case(after, dtype, f, c, grad, activated, beta)
                        cells.append(f"{k['loop']:.1f} ({k['mufu']:.2f})")
                        rate = element_rate(k, c)[2] * mode_bytes(form, grad, size, c)
                        bounds.append(
                            ", ".join(_pct(rate / BANDWIDTHS[g][0]) for g in ("H100", "H200"))
                        )
                    print(
                        f"| {form} | {activated} | {label} | {dtype} | {cells[0]} | {cells[1]} "
                        f"| {bounds[0]} | {bounds[1]} |"
                    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="commit whose sources are the before")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--modes", action="store_true", help="also every mode of the after kernel")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = materialize(SOURCES, args.before, tmp / "before")
        compile_cubin(old, QFL_CU, args.arch, tmp / "before.cubin", HALF_FLAGS)
        compile_cubin(ROOT, QFL_CU, args.arch, tmp / "after.cubin", HALF_FLAGS)
        before = Listing(tmp / "before.cubin", args.arch)
        after = Listing(tmp / "after.cubin", args.arch)
    print_tables(table(before, after, args.classes), args.classes)
    if args.modes:
        print_modes(after, args.classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
