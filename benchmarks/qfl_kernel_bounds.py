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
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "csrc/gfl_math.h",
    "csrc/cuda/common.cuh",
    "csrc/cuda/launchers.h",
    "csrc/cuda/qfl_kernel.cuh",
    "csrc/cuda/qfl.cu",
]
SMS, CLOCK_HZ = 132, 1.98e9
ISSUE = SMS * 4 * 32 * CLOCK_HZ  # thread issue slots / s
MUFU = SMS * 16 * CLOCK_HZ  # MUFU lane-operations / s
BANDWIDTHS = {"H100": (3.0e12, 3.35e12), "H200": (4.3e12, 4.8e12)}  # (measured copy, datasheet)
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-std=c++17",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
STORAGE = {
    "fp32": ("float", 4),
    "bf16": ("__nv_bfloat16", 2),
    "fp16": ("__half", 2),
    "fp64": ("double", 8),
}
# the before kernel's `mode` / `activated` parameters: offsets from the parameter base of
# constant bank 0 (by the size of its beta: float or double), and that base per arch
BEFORE_MODE = {4: (0x54, 0x58), 8: (0x58, 0x5C)}
PARAM_BASE = {80: 0x160, 86: 0x160, 89: 0x160, 90: 0x210}


# ---------------------------------------------------------------------------------------------
# Tools.


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton  # noqa: F401  (bundles nvdisasm and cuobjdump)

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    sys.exit(f"qfl_kernel_bounds: {name} not found")


def compile_cubin(src: Path, arch: int, out: Path) -> None:
    from torch.utils.cpp_extension import include_paths

    cmd = [
        "nvcc",
        *NVCC_FLAGS,
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        "-cubin",
        "-o",
        str(out),
        str(src / "csrc/cuda/qfl.cu"),
        "-I",
        str(src / "csrc/cuda"),
        "-I",
        str(src / "csrc"),
        "-I",
        include_paths()[0],
    ]
    subprocess.run(cmd, check=True)


def sass_of(cubin: Path) -> str:
    env = dict(
        os.environ,
        PATH=str(Path(_tool("nvdisasm")).parent) + os.pathsep + os.environ.get("PATH", ""),
    )
    return subprocess.run(
        [_tool("cuobjdump"), "-sass", str(cubin)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout


def registers(cubin: Path) -> dict[str, int]:
    out = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", str(cubin)], check=True, capture_output=True, text=True
    ).stdout
    regs, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if m and name:
            assert m.group(2) == "0" and m.group(3) == "0", f"{name} uses stack / local memory"
            regs[name] = int(m.group(1))
    return regs


def demangle(names: list[str]) -> dict[str, str]:
    out = (
        subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .split("\n")
    )
    return dict(zip(names, out))


# ---------------------------------------------------------------------------------------------
# SASS paths.


def parse(listing: str) -> dict[str, list[tuple[int, str]]]:
    funcs = {}
    for part in re.split(r"\n\s*Function : ", listing)[1:]:
        name = part.split("\n", 1)[0].strip()
        ins = []
        for line in part.split("\n"):
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*(/\*.*)?$", line)
            if m:
                ins.append((int(m.group(1), 16), m.group(2).rstrip(" ;")))
        funcs[name] = ins
    return funcs


def branch_target(text: str) -> int | None:
    m = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def loops(ins):
    found = [(t, a) for a, text in ins if (t := branch_target(text)) is not None and t <= a]
    inner = [
        lp for lp in found if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in found)
    ]
    return found, inner


def _pred_writer(ins, i, preg):
    for j in range(i - 1, -1, -1):
        body = re.sub(r"^@!?U?P\w+\s+", "", ins[j][1])
        ops = body.split(None, 1)
        if len(ops) < 2:
            continue
        dsts = [d.strip() for d in ops[1].split(",")[:2]]
        if (
            re.match(r"(U?I|F|D|H)SETP|FCHK", ops[0])
            and preg in dsts[: 2 if "SETP" in ops[0] else 1]
        ):
            return body
    return None


def _taken(ins, i, text, env) -> bool:
    m = re.match(r"@(!?)(P\d)\s+BRA", text)
    negated, preg = m.group(1) == "!", m.group(2)
    w = _pred_writer(ins, i, preg)
    value = False  # FCHK and data tests: the common case is "no special case"
    if w and re.match(r"ISETP\.GT\.U32\.AND P\d, PT, R\d+, 0x1ffffff", w):
        value = True  # the reciprocal's normal-range fast path
    elif w and (mm := re.match(r"ISETP\.(NE|EQ)\.AND P\d, PT, (\w+), (\w+)", w)):
        a, b = mm.group(2), mm.group(3)
        reg, other = (a, b) if a in env["mode"] or a in env["act"] else (b, a)
        if reg in env["mode"]:
            k = 0 if other == "RZ" else int(other, 16) if other.startswith("0x") else None
            value = (env["mode_value"] != k) == (mm.group(1) == "NE")
        elif reg in env["act"]:
            value = (env["act_value"] != 0) == (mm.group(1) == "NE")
    return value != negated


def common_path(ins, lo, hi, env):
    at = {a: k for k, (a, _) in enumerate(ins)}
    i, path = at[lo], []
    while True:
        a, text = ins[i]
        path.append(text)
        if a == hi:
            return path
        t = branch_target(text)
        if t is not None and t > a and (not text.startswith("@") or _taken(ins, i, text, env)):
            i = at[t]
            continue
        i += 1


def runtime_env(ins, mode_off: int, act_off: int, mode: int, activated: bool):
    """The registers that hold the runtime mode / activated parameters (before kernel)."""
    mode_regs, act_regs = set(), set()
    for _, text in ins:
        m = re.match(r"U?LDC(?:\.U8|\.S8)? (U?R\d+), c\[0x0\]\[(0x[0-9a-f]+)\]", text)
        if m and int(m.group(2), 16) == mode_off:
            mode_regs.add(m.group(1))
        if m and int(m.group(2), 16) == act_off:
            act_regs.add(m.group(1))
        m = re.match(r"UPRMT (UR\d+), (UR\d+), 0x8880", text)
        if m and m.group(2) in act_regs:
            act_regs.add(m.group(1))
    return {"mode": mode_regs, "act": act_regs, "mode_value": mode, "act_value": activated}


def element_loops(ins, env, need_mufu: bool):
    """The innermost loops that do element math, longest common path first (after: the 16-byte
    word loop, then the scalar loop of the row's head and tail)."""
    _, inner = loops(ins)
    found = []
    for lo, hi in inner:
        path = common_path(ins, lo, hi, env)
        if need_mufu and not any("MUFU" in t for t in path):
            continue
        if not need_mufu and len(path) < 24:
            continue  # the shuffle reduction's loop
        found.append((lo, hi, path))
    return sorted(found, key=lambda f: -len(f[2]))


def row_work(ins, env) -> int:
    """The row loop's common path minus the element loops it passes through."""
    found, inner = loops(ins)
    lo, hi = min((lp for lp in found if lp not in inner), key=lambda lp: lp[0] - lp[1])
    path_addrs = set()
    at = {a: k for k, (a, _) in enumerate(ins)}
    i = at[lo]
    while True:  # the addresses of the row loop's common path
        a, text = ins[i]
        path_addrs.add(a)
        if a == hi:
            break
        t = branch_target(text)
        if t is not None and t > a and (not text.startswith("@") or _taken(ins, i, text, env)):
            i = at[t]
            continue
        i += 1
    inside = 0
    for l_lo, l_hi in inner:
        if l_lo in path_addrs and lo <= l_lo and l_hi <= hi:
            inside += len(common_path(ins, l_lo, l_hi, env))
    return len(path_addrs) - inside


# ---------------------------------------------------------------------------------------------
# The cases.


def occupancy(regs: int, block: int = 256) -> float:
    per_warp = math.ceil(regs * 32 / 256) * 256
    warps = (16384 // per_warp) * 4
    blocks = min(warps // (block // 32), 32, 2048 // block)
    return blocks * block / 2048


def after_lanes(c: int, size: int) -> int:
    """qfl_kernel.cuh's qfl_lanes_log2, as lanes."""
    width = 16 // size
    words = (c + width - 1) // width
    lowest = 0 if c * size <= 16 else 1
    cost = {
        s: (1 << s) * (((words + (1 << s) - 1) >> s) * width * 30 + 40 + 2 * s)
        for s in range(lowest, 6)
    }
    cheapest = min(cost.values())
    return 1 << max(s for s in cost if cost[s] * 100 <= cheapest * 103)


class Listing:
    def __init__(self, cubin: Path, arch: int):
        self.arch = arch
        self.funcs = parse(sass_of(cubin))
        self.names = demangle(list(self.funcs))
        self.regs = registers(cubin)

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
    env = runtime_env(ins, -1, -1, beta, activated)
    (_, _, path), *rest = element_loops(ins, env, need_mufu=not activated)
    width = 16 // size if size < 8 else 1
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
    }


MODES = {  # mode -> (form, gradient written, bytes per row besides pred / target / gradient)
    "labels fwd": ("labels", False, 8 + 4 + 4),  # label, score read; loss written
    "labels fused": ("labels", True, 8 + 4 + 4),
    "labels bwd": ("labels", True, 8 + 4 + 4),  # label, score, row scale read
    "dense fwd": ("dense", False, 4),  # loss written
    "dense fused": ("dense", True, 4),
    "dense bwd": ("dense", True, 4),  # row scale read
}


def table(before: Listing, after: Listing, c: int) -> list[dict]:
    rows = []
    for mode, (form, grad, per_row) in MODES.items():
        for dtype in ("fp32", "bf16", "fp16"):
            size = STORAGE[dtype][1]
            # dense targets in float32, as the benchmarks (and detectors) pass them
            f = "dense-opmath" if form == "dense" and size == 2 else form
            tsize = 0 if form == "labels" else 4
            b = before_case(before, dtype, f, c)
            a = after_case(after, dtype, f, c, grad)
            nbytes = size + tsize + (size if grad else 0) + per_row / c
            r = {"mode": mode, "dtype": dtype, "bytes": nbytes}
            for key, k in (("b", b), ("a", a)):
                eff = (k["lane_work"] + k["row"] * k["lanes"]) / c
                mufu = k["lane_mufu"] / c
                rate = min(ISSUE / eff, MUFU / mufu)
                r.update(
                    {
                        f"{key}_loop": k["loop"],
                        f"{key}_eff": eff,
                        f"{key}_mufu": mufu,
                        f"{key}_row": k["row"],
                        f"{key}_lanes": k["lanes"],
                        f"{key}_regs": k["regs"],
                        f"{key}_occ": occupancy(k["regs"]),
                    }
                )
                for gpu, (measured, sheet) in BANDWIDTHS.items():
                    r[f"{key}_{gpu}"] = (rate * nbytes / measured, rate * nbytes / sheet)
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


def print_modes(after: Listing, c: int) -> None:
    """Every compiled mode of the after kernel, loop SASS per element (fp32 and bf16)."""
    print("\n| form | activated | beta | dtype | fwd SASS/elem (MUFU) | with gradient (MUFU) |")
    print("|---|---|---|---|---|---|")
    for form in ("labels", "dense"):
        for activated in (False, True):
            for beta, label in ((2, "2"), (0, "0"), (1, "1"), (3, "general")):
                for dtype in ("fp32", "bf16"):
                    f = "dense-opmath" if form == "dense" and dtype == "bf16" else form
                    cells = []
                    for grad in (False, True):
                        k = after_case(after, dtype, f, c, grad, activated, beta)
                        cells.append(f"{k['loop']:.1f} ({k['mufu']:.2f})")
                    print(f"| {form} | {activated} | {label} | {dtype} | {cells[0]} | {cells[1]} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="commit whose sources are the before")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--modes", action="store_true", help="also every mode of the after kernel")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        for f in SOURCES:
            (old / f).parent.mkdir(parents=True, exist_ok=True)
            (old / f).write_bytes(
                subprocess.run(
                    ["git", "show", f"{args.before}:{f}"], cwd=ROOT, check=True, capture_output=True
                ).stdout
            )
        compile_cubin(old, args.arch, tmp / "before.cubin")
        compile_cubin(ROOT, args.arch, tmp / "after.cubin")
        before = Listing(tmp / "before.cubin", args.arch)
        after = Listing(tmp / "after.cubin", args.arch)
    print_tables(table(before, after, args.classes), args.classes)
    if args.modes:
        print_modes(after, args.classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
