"""Count the SASS instructions a warp issues along one launch's path (no GPU needed).

    python -m benchmarks.sass_path_count KERNEL.cubin --kernel SUBSTRING --arch 90 \\
        --block 256 --grid 1 --params 'ptr:0x7f0000000000,ptr:0,...' [--warps all|0] \\
        [--decide ADDR=taken|fall ...] [--nvdisasm PATH]

Method: nvdisasm gives the kernel's SASS; this walks it for lane 0 of each warp of block 0,
executing the integer and predicate instructions (registers, uniform registers, predicates,
constant bank 0 with the launch's geometry and parameters, special registers) and treating every
loaded or floating-point value as unknown.  Every instruction reached counts once, predicated-off
ones included (they take an issue slot).  Lane 0 stands for its warp: in these kernels a lane with
a higher index never runs a longer path than lane 0 (loops of the form `for (i = lane; i < n;
i += stride)`, row guards `row < m`), so lane 0's path is the warp's.  A branch whose predicate is
unknown (it depends on loaded data) takes the direction that skips a call of a libdevice slow
path (division, reciprocal: operands near the ends of the exponent range) where that is what it
guards; any other must be decided on the command line, by address (--decide 0x1600=taken) or by
the source line it comes from (--decide-at gfl_math.h:179=fall), else the walk stops and names
it.  BRA.DIV (taken only when the warp has diverged) is not taken.  The totals are
warp-instructions issued per block; divide by the elements the block handles.

Opcode classes in the report: fma (FFMA/FADD/FMUL/IMAD/... the FP32/FMA pipes), alu (integer and
logic, comparisons, selects, conversions), mufu (the special function unit: EX2, LG2, RCP; 16
lanes per SM and clock), lsu (shared/global/constant memory, shuffles), uniform (the uniform
datapath: ULDC, UIADD3, ...), control (branches, barriers, convergence).  It is a first-order
model (one issue slot per instruction; no latencies, no dual issue), what the notes' bound uses.

The parts: benchmarks/sass_listing.py reads the SASS, benchmarks/sass_lane.py holds lane 0's
values and executes the integer and predicate instructions, and this module walks the path,
counts and reports.
"""

from __future__ import annotations

import argparse
import re
import struct
import subprocess
import sys
from collections import Counter

from benchmarks.sass_lane import Lane, U
from benchmarks.sass_listing import Instr, Kernel, default_nvdisasm, parse

PARAM_BASE = {80: 0x160, 86: 0x160, 89: 0x160, 90: 0x210}


class Unknown(Exception):
    """The walk met a branch or exit that depends on data and was not decided."""


class Machine(Lane):
    """One warp's walk from the kernel's entry (lane 0's values in :class:`Lane`): which
    instruction runs next, each one reached counted by class, opcode and region."""

    def __init__(
        self, kernel: Kernel, const0: dict[int, int], sregs: dict[str, int], decide: dict[int, bool]
    ):
        super().__init__(const0, sregs)
        self.k = kernel
        self.decide = decide
        self.calls: list[int] = []
        self.counts: Counter[str] = Counter()
        self.total = 0
        self.regions: list[tuple[str, int, int]] = []
        self.fast_paths = True
        self.decide_at: dict[str, bool] = {}

    # ---- the walk
    @staticmethod
    def klass(op: str) -> str:
        base = op.split(".")[0]
        if base == "MUFU":
            return "mufu"
        if base in (
            "FFMA",
            "FADD",
            "FMUL",
            "IMAD",
            "DFMA",
            "DADD",
            "DMUL",
            "HFMA2",
            "HADD2",
            "HMUL2",
            "FSWZADD",
        ):
            return "fma"
        if base in (
            "LDG",
            "STG",
            "LDS",
            "STS",
            "LDL",
            "STL",
            "LD",
            "ST",
            "LDC",
            "ATOM",
            "RED",
            "LDSM",
            "SHFL",
        ):
            return "lsu"
        if base.startswith("U") or base in ("S2UR", "R2UR"):
            return "uniform"
        if base in (
            "BRA",
            "EXIT",
            "CALL",
            "RET",
            "BAR",
            "BSSY",
            "BSYNC",
            "WARPSYNC",
            "NOP",
            "DEPBAR",
            "ENDCOLLECTIVE",
        ):
            return "control"
        return "alu"

    def run(self, start_index: int = 0, limit: int = 2_000_000) -> None:
        i = start_index
        steps = 0
        while True:
            steps += 1
            if steps > limit:
                raise RuntimeError("instruction limit reached (an infinite loop?)")
            ins = self.k.instrs[i]
            self.total += 1
            self.counts[self.klass(ins.op)] += 1
            for name, lo, hi in self.regions:
                if lo <= ins.addr < hi:
                    self.counts["region:" + name] += 1
            self.counts["op:" + ins.op.split(".")[0]] += 1
            g = True if ins.guard is None else self.pred(ins.guard)
            op0 = ins.op.split(".")[0]
            if op0 in ("BRA", "EXIT", "CALL", "RET"):
                nxt = self.control(ins, g, i)
                if nxt is None:
                    return
                i = nxt
                continue
            if g is None:
                # a predicated data instruction with an unknown guard: its destination is unknown
                if ins.args and not ins.args[0].startswith(("desc", "[")):
                    for d in self.dests(ins):
                        if d.startswith(("R", "UR")) and d not in ("RZ", "URZ"):
                            self.setreg(d, U)
                        elif d.startswith(("P", "UP")) and d not in ("PT", "UPT"):
                            self.setreg(d, U)
                i += 1
                continue
            if g:
                self.execute(ins)
            i += 1

    def control(self, ins: Instr, g, i):
        op = ins.op
        if op.startswith("EXIT"):
            if g is None:
                raise Unknown(f"EXIT with an unknown guard at {ins.addr:#x}")
            return None if g else i + 1
        if op.startswith("RET"):
            if g is False:
                return i + 1
            return self.calls.pop()
        target = re.search(r"`\(([^)]+)\)", ins.text)
        tindex = self.k.labels.get(target.group(1)) if target else None
        if op.startswith("CALL"):
            if g is False:
                return i + 1
            self.calls.append(i + 1)
            return tindex
        if op.startswith("BRA.DIV"):
            return i + 1
        # BRA [P,] target: an extra predicate operand also conditions the branch
        cond = g
        extra = [a for a in ins.args if re.fullmatch(r"!?U?P[T0-9]", a)]
        for e in extra:
            v = self.pred(e)
            cond = None if (cond is None or v is None) else (cond and v)
        if ins.addr in self.decide:
            cond = self.decide[ins.addr]
        elif cond is None:
            for loc, taken in self.decide_at.items():
                if loc in ins.where:
                    cond = taken
        if cond is None and self.fast_paths:
            cond = self.fast_path(i, tindex)
        if cond is None:
            raise Unknown(f"branch at {ins.addr:#x} depends on data: {ins.text}")
        return tindex if cond else i + 1

    def fast_path(self, i: int, target: int):
        """For a data-dependent branch around a call of a libdevice slow path (the division's
        and reciprocal's, taken only for operands near the ends of the exponent range): the
        direction that skips the call, else None."""

        def calls_slow_path(start: int) -> bool:
            for ins in self.k.instrs[start : start + 4]:
                if ins.op.startswith("CALL") and "slowpath" in ins.text:
                    return True
                if ins.op.startswith(("BRA", "EXIT", "RET")):
                    return False
            return False

        if calls_slow_path(i + 1):
            return True
        if target is not None and calls_slow_path(target):
            return False
        return None


def parse_params(spec: str) -> bytes:
    """'ptr:0x1000,i64:5,i32:17,f32:1.0,f64:2.0,bool:1' packed with C alignment."""
    out = bytearray()
    for item in filter(None, spec.split(",")):
        kind, _, val = item.partition(":")
        fmt, size = {
            "ptr": ("<Q", 8),
            "i64": ("<q", 8),
            "i32": ("<i", 4),
            "u32": ("<I", 4),
            "f32": ("<f", 4),
            "f64": ("<d", 8),
            "bool": ("<B", 1),
        }[kind]
        while len(out) % size:
            out.append(0)
        v = float(val) if kind.startswith("f") else int(val, 0)
        out += struct.pack(fmt, v)
    return bytes(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cubin")
    ap.add_argument("--kernel", required=True, help="a substring of the mangled kernel name")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--grid", type=int, default=1)
    ap.add_argument("--params", required=True)
    ap.add_argument("--warps", default="all", help="'all' (every warp of block 0) or a warp index")
    ap.add_argument("--decide", action="append", default=[], help="ADDR=taken|fall")
    ap.add_argument(
        "--decide-at",
        action="append",
        default=[],
        help="FILE:LINE=taken|fall for the data-dependent branches of that source "
        "line (e.g. gfl_math.h:179=fall: DFL targets are not NaN)",
    )
    ap.add_argument("--nvdisasm", default=default_nvdisasm())
    ap.add_argument("--per", type=float, default=0.0, help="divide the totals by this (elements)")
    ap.add_argument(
        "--region",
        action="append",
        default=[],
        help="NAME=LO-HI: also count the instructions at addresses [LO, HI)",
    )
    args = ap.parse_args(argv)
    sass = subprocess.run(
        [args.nvdisasm, "-c", "-gi", args.cubin], check=True, capture_output=True, text=True
    ).stdout
    kernel = parse(sass, args.kernel)
    params = parse_params(args.params)
    c0 = {0x0: args.block, 0x4: 1, 0x8: 1, 0xC: args.grid, 0x10: 1, 0x14: 1, 0x28: 0xFFFC00}
    base = PARAM_BASE[args.arch]
    padded = params + bytes(-len(params) % 4)
    for off in range(0, len(padded), 4):
        c0[base + off] = struct.unpack_from("<I", padded, off)[0]
    decide = {}
    for d in args.decide:
        addr, _, what = d.partition("=")
        decide[int(addr, 16)] = what == "taken"
    warps = range(args.block // 32) if args.warps == "all" else [int(args.warps)]
    total = 0
    counts: Counter[str] = Counter()
    for w in warps:
        # block 0 of a one-block cluster; the shared window's base is any aligned value
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
        mach = Machine(kernel, c0, sregs, decide)
        for d in args.decide_at:
            loc, _, what = d.rpartition("=")
            mach.decide_at[loc] = what == "taken"
        for r in args.region:
            name, _, span = r.partition("=")
            lo, _, hi = span.partition("-")
            mach.regions.append((name, int(lo, 16), int(hi, 16)))
        try:
            mach.run()
        except Unknown as e:
            print(f"warp {w}: {e}", file=sys.stderr)
            return 2
        total += mach.total
        counts += mach.counts
    per = args.per or 1.0
    print(f"kernel {kernel.name}")
    print(f"warps {len(warps)}  warp-instructions {total}  per element {total / per:.3f}")
    classes = ["fma", "alu", "mufu", "lsu", "uniform", "control"]
    print("  " + "  ".join(f"{c} {counts[c] / per:.3f}" for c in classes))
    regions = [(k[7:], v) for k, v in counts.items() if k.startswith("region:")]
    if regions:
        print("  regions: " + "  ".join(f"{k} {v / per:.3f}" for k, v in regions))
    ops = sorted(
        ((k[3:], v) for k, v in counts.items() if k.startswith("op:")), key=lambda kv: -kv[1]
    )
    print("  " + " ".join(f"{k}:{v / per:.2f}" for k, v in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
