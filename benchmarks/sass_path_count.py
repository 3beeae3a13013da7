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
"""

from __future__ import annotations

import argparse
import math
import re
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MASK32 = 0xFFFFFFFF
PARAM_BASE = {80: 0x160, 86: 0x160, 89: 0x160, 90: 0x210}


def default_nvdisasm() -> str:
    try:
        import triton  # the CUDA toolkit here ships no nvdisasm; Triton bundles one
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")
    except ImportError:
        return "nvdisasm"


@dataclass
class Instr:
    addr: int
    guard: str | None  # "P0", "!P0", "UP1", ...
    op: str            # full opcode with modifiers, e.g. "IMAD.WIDE.U32"
    args: list[str]
    text: str
    where: tuple[str, ...] = ()  # "file.h:LINE" of the source line and the lines it is inlined at


@dataclass
class Kernel:
    name: str
    instrs: list[Instr]
    labels: dict[str, int] = field(default_factory=dict)  # label -> index
    by_addr: dict[int, int] = field(default_factory=dict)


def split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9])?\s*([A-Z0-9_.]+)\s*(.*?)\s*;")


def parse(sass: str, name_sub: str) -> Kernel:
    kernels: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        m = re.match(r"^\s*\.text\.(\S+):", line)
        if m:
            current = m.group(1)
            kernels[current] = []
            continue
        if current is not None:
            kernels[current].append(line)
    names = [n for n in kernels if name_sub in n]
    if len(names) != 1:
        sys.exit(f"--kernel {name_sub!r} matches {len(names)} kernels: {names[:8]}")
    name = names[0]
    k = Kernel(name, [])
    pending: list[str] = []
    where: list[str] = []  # the current source location (an instruction keeps the last one seen)
    fresh = True
    for line in kernels[name]:
        wm = re.match(r'^\s*//## File "([^"]+)", line (\d+)', line)
        if wm:
            if fresh:
                where = []
                fresh = False
            where.append(f"{Path(wm.group(1)).name}:{wm.group(2)}")
            for inl in re.finditer(r'inlined at "([^"]+)", line (\d+)', line):
                where.append(f"{Path(inl.group(1)).name}:{inl.group(2)}")
            continue
        lm = re.match(r"^\s*(\.L_x_\d+|\$[\w$.]+):", line)
        if lm:
            pending.append(lm.group(1))
            continue
        m = INSTR_RE.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        guard = m.group(2)[1:] if m.group(2) else None
        ins = Instr(addr, guard, m.group(3), split_args(m.group(4)), line.strip(), tuple(where))
        fresh = True
        for lab in pending:
            k.labels[lab] = len(k.instrs)
        pending = []
        k.by_addr[addr] = len(k.instrs)
        k.instrs.append(ins)
    return k


class Unknown(Exception):
    pass


U = None  # an unknown value


def u32(x):
    return None if x is None else x & MASK32


def s32(x):
    x &= MASK32
    return x - (1 << 32) if x & 0x80000000 else x


class Machine:
    def __init__(self, kernel: Kernel, const0: dict[int, int], sregs: dict[str, int],
                 decide: dict[int, bool]):
        self.k = kernel
        self.c0 = const0
        self.sregs = sregs
        self.decide = decide
        self.r: dict[int, int | None] = {}
        self.ur: dict[int, int | None] = {}
        self.p: dict[int, bool | None] = {}
        self.up: dict[int, bool | None] = {}
        self.calls: list[int] = []
        self.counts: Counter[str] = Counter()
        self.total = 0
        self.regions: list[tuple[str, int, int]] = []
        self.fast_paths = True
        self.decide_at: dict[str, bool] = {}

    # ---- operands
    def reg(self, tok: str, carry_form: bool = False):
        """A register, uniform register, constant or immediate operand (None: unknown).  With
        carry_form, -x is 2^32 - x unmasked (the hardware adds ~x + 1, so -0 carries out)."""
        t = tok.replace(".reuse", "")
        neg = t.startswith("-")
        t = t.lstrip("-")
        inv = t.startswith("~")
        t = t.lstrip("~")
        if t.startswith("|"):
            return U
        t = re.sub(r"\.(H0_H0|H1_H1|H0|H1|B[0-3]|64|F32|X)$", "", t)
        if t in ("RZ", "URZ", "SRZ"):
            v = 0
        elif re.fullmatch(r"R\d+", t):
            v = self.r.get(int(t[1:]), U)
        elif re.fullmatch(r"UR\d+", t):
            v = self.ur.get(int(t[2:]), U)
        elif t.startswith("c["):
            off = self.const_offset(t)
            v = U if off is None else self.c0.get(off, U)
        else:
            v = self.imm(t)
        if v is None:
            return U
        if inv:
            v = ~v & MASK32
        if neg:
            return (~v & MASK32) + 1 if carry_form else (-v) & MASK32
        return v & MASK32

    def const_offset(self, t: str):
        """The byte offset of c[0x0][...] (an immediate, a register, or register + immediate)."""
        m = re.fullmatch(r"c\[0x0\]\[([^\]]+)\]", t)
        if m is None:
            return None
        total = 0
        for term in m.group(1).split("+"):
            term = term.strip()
            v = self.imm(term) if term.startswith(("0x", "-")) or term.isdigit() else self.reg(term)
            if v is None:
                return None
            total += v
        return total & MASK32

    @staticmethod
    def imm(t: str):
        try:
            if re.fullmatch(r"-?0x[0-9a-fA-F]+", t):
                return int(t, 16) & MASK32
            if re.fullmatch(r"-?\d+", t):
                return int(t) & MASK32
            if re.fullmatch(r"[-+]?(\d+\.\d*(e[-+]?\d+)?|INF|QNAN)", t):
                f = float(t.replace("INF", "inf").replace("QNAN", "nan"))
                return struct.unpack("<I", struct.pack("<f", f))[0]
        except ValueError:
            pass
        return U

    def pred(self, tok: str):
        neg = tok.startswith("!")
        t = tok.lstrip("!")
        if t in ("PT", "UPT"):
            v = True
        elif t.startswith("UP"):
            v = self.up.get(int(t[2:]), U)
        elif t.startswith("P"):
            v = self.p.get(int(t[1:]), U)
        else:
            raise ValueError(tok)
        return None if v is None else (not v if neg else v)

    def setreg(self, tok: str, v):
        t = tok.replace(".reuse", "")
        if t in ("RZ", "URZ", "PT", "UPT"):
            return
        if re.fullmatch(r"R\d+", t):
            self.r[int(t[1:])] = u32(v)
        elif re.fullmatch(r"UR\d+", t):
            self.ur[int(t[2:])] = u32(v)
        elif re.fullmatch(r"P\d", t):
            self.p[int(t[1:])] = v
        elif re.fullmatch(r"UP\d", t):
            self.up[int(t[2:])] = v
        else:
            raise ValueError(tok)

    def setpair(self, tok: str, v):
        t = tok.replace(".reuse", "")
        if t in ("RZ", "URZ"):
            return
        lo = None if v is None else v & MASK32
        hi = None if v is None else (v >> 32) & MASK32
        self.setreg(t, lo)
        self.setreg(("UR" if t.startswith("UR") else "R") + str(int(t.lstrip("UR")) + 1), hi)

    def pair(self, tok: str):
        t = tok.replace(".reuse", "")
        if t in ("RZ", "URZ"):
            return 0
        lo = self.reg(t)
        hi = self.reg(("UR" if t.startswith("UR") else "R") + str(int(t.lstrip("UR")) + 1))
        return None if lo is None or hi is None else lo | (hi << 32)

    # ---- execution
    @staticmethod
    def klass(op: str) -> str:
        base = op.split(".")[0]
        if base == "MUFU":
            return "mufu"
        if base in ("FFMA", "FADD", "FMUL", "IMAD", "DFMA", "DADD", "DMUL", "HFMA2", "HADD2",
                    "HMUL2", "FSWZADD"):
            return "fma"
        if base in ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "LDC", "ATOM", "RED",
                    "LDSM", "SHFL"):
            return "lsu"
        if base.startswith("U") or base in ("S2UR", "R2UR"):
            return "uniform"
        if base in ("BRA", "EXIT", "CALL", "RET", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP",
                    "DEPBAR", "ENDCOLLECTIVE"):
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

    def dests(self, ins: Instr) -> list[str]:
        a = ins.args
        op = ins.op
        if op.startswith(("ISETP", "UISETP", "FSETP", "DSETP", "HSETP2", "PLOP3", "UPLOP3")):
            return a[:2]
        if op.startswith(("ST", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "RED", "ATOM")):
            return []
        return a[:1]

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
            for ins in self.k.instrs[start:start + 4]:
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

    def execute(self, ins: Instr) -> None:  # noqa: C901 (one case per opcode)
        op, a = ins.op, ins.args
        parts = op.split(".")
        base = parts[0]
        mods = set(parts[1:])
        R = self.reg
        if base in ("MOV", "UMOV", "R2UR", "MOV32I"):
            self.setreg(a[0], R(a[1]))
        elif base in ("IMAD", "UIMAD"):
            if "WIDE" in mods:
                x, y = R(a[1]), R(a[2])
                c = self.pair(a[3]) if not a[3].startswith(("0x", "-")) else R(a[3])
                if None in (x, y, c):
                    return self.setpair(a[0], U)
                if "U32" not in mods:
                    x, y = s32(x), s32(y)
                    c = c - (1 << 64) if c >> 63 else c
                return self.setpair(a[0], (x * y + c) & ((1 << 64) - 1))
            x, y, c = R(a[1]), R(a[2]), R(a[3])
            carry = 0
            if "X" in mods and len(a) > 4:
                pv = self.pred(a[4])
                if pv is None:
                    return self.setreg(a[0], U)
                carry = int(pv)
            if None in (x, y, c):
                return self.setreg(a[0], U)
            if "HI" in mods:
                if "U32" in mods:
                    hi = (x * y) >> 32
                else:
                    hi = (s32(x) * s32(y)) >> 32
                return self.setreg(a[0], hi + c + carry)
            self.setreg(a[0], x * y + c + carry)
        elif base in ("IADD3", "UIADD3"):
            outs = [t for t in a[1:] if re.fullmatch(r"!?U?P[T0-9]", t)]
            vals = [t for t in a[1:] if not re.fullmatch(r"!?U?P[T0-9]", t)]
            n_out = 0 if "X" in mods else len(outs)
            carry_outs = outs[:n_out] if "X" not in mods else []
            carry_ins = outs if "X" in mods else []
            xs = [self.reg(t, carry_form=True) for t in vals[:3]]
            cins = [self.pred(t) for t in carry_ins]
            if None in xs or None in cins:
                self.setreg(a[0], U)
                for t in carry_outs:
                    self.setreg(t, U)
                return
            total = sum(xs) + sum(int(c) for c in cins)
            self.setreg(a[0], total)
            # the carry of a three-input add is 0..2, one unit per carry predicate (IADD3.X adds
            # each carry-in predicate as 1)
            carry = total >> 32
            for n, t in enumerate(carry_outs):
                self.setreg(t, carry >= n + 1 if len(carry_outs) > 1 else bool(carry & 1))
        elif base in ("VIADD", "UIADD"):
            x, y = R(a[1]), R(a[2])
            self.setreg(a[0], U if None in (x, y) else x + y)
        elif base in ("LEA", "ULEA"):
            outs = [t for t in a[1:] if re.fullmatch(r"!?U?P[T0-9]", t)]
            vals = [t for t in a[1:] if not re.fullmatch(r"!?U?P[T0-9]", t)]
            carry_out = outs[0] if outs and "X" not in mods else None
            carry_in = self.pred(outs[-1]) if outs and "X" in mods else False
            if "HI" in mods:
                if "SX32" in mods:
                    x, y, sh = R(vals[0]), R(vals[1]), R(vals[2])
                    hi = None if x is None else (MASK32 if x & 0x80000000 else 0)
                else:
                    x, y, hi, sh = R(vals[0]), R(vals[1]), R(vals[2]), R(vals[3])
                if None in (x, y, hi, sh, carry_in):
                    self.setreg(a[0], U)
                    if carry_out:
                        self.setreg(carry_out, U)
                    return
                wide = ((hi << 32) | x) << sh
                total = y + ((wide >> 32) & MASK32) + int(carry_in)
            else:
                x, y, sh = R(vals[0]), R(vals[1]), R(vals[2])
                if None in (x, y, sh, carry_in):
                    self.setreg(a[0], U)
                    if carry_out:
                        self.setreg(carry_out, U)
                    return
                total = ((x << sh) & MASK32) + y + int(carry_in)
            self.setreg(a[0], total)
            if carry_out:
                self.setreg(carry_out, bool(total >> 32))
        elif base in ("LOP3", "ULOP3"):
            if re.fullmatch(r"U?P\d|U?PT", a[0]):
                dst_p, rest = a[0], a[1:]
                x, y, z, lut = R(rest[1]), R(rest[2]), R(rest[3]), R(rest[4])
                if None in (x, y, z, lut):
                    return self.setreg(dst_p, U)
                self.setreg(dst_p, self.lut3(x, y, z, lut) != 0)
                return
            x, y, z, lut = R(a[1]), R(a[2]), R(a[3]), R(a[4])
            res = U if None in (x, y, z, lut) else self.lut3(x, y, z, lut)
            self.setreg(a[0], res)
            if len(a) > 5 and re.fullmatch(r"U?P\d", a[5]):
                self.setreg(a[5], None if res is None else res != 0)
        elif base in ("SHF", "USHF"):
            lo, sh, hi = R(a[1]), R(a[2]), R(a[3])
            if None in (lo, sh, hi):
                return self.setreg(a[0], U)
            sh = sh & 63 if ("U64" in mods or "S64" in mods) else min(sh, 32)
            x = (hi << 32) | lo
            signed = "S32" in mods or "S64" in mods
            if signed and hi & 0x80000000:
                x -= 1 << 64
            if "L" in mods:
                y = x << sh
            else:
                y = x >> sh
            res = (y >> 32) if "HI" in mods else y
            self.setreg(a[0], res)
        elif base in ("SHL", "USHL"):
            x, sh = R(a[1]), R(a[2])
            self.setreg(a[0], U if None in (x, sh) else x << (sh & 31))
        elif base in ("SHR", "USHR"):
            x, sh = R(a[1]), R(a[2])
            if None in (x, sh):
                return self.setreg(a[0], U)
            self.setreg(a[0], (s32(x) if "S32" in mods else x) >> (sh & 31))
        elif base in ("SEL", "USEL", "FSEL"):
            pv = self.pred(a[3])
            x, y = R(a[1]), R(a[2])
            self.setreg(a[0], U if pv is None else (x if pv else y))
        elif base in ("ISETP", "UISETP"):
            self.isetp(a, mods)
        elif base in ("PLOP3", "UPLOP3"):
            ps = [self.pred(t) for t in a[2:5]]
            lut = R(a[5])
            if None in ps or lut is None:
                self.setreg(a[0], U)
                return self.setreg(a[1], U)
            idx = (int(ps[0]) << 2) | (int(ps[1]) << 1) | int(ps[2])
            self.setreg(a[0], bool((lut >> idx) & 1))
            if len(a) > 6:
                lut2 = R(a[6])
                self.setreg(a[1], None if lut2 is None else bool((lut2 >> idx) & 1))
        elif base in ("LDC", "ULDC"):
            off = self.const_offset(a[1])
            if off is None:
                return self.setpair(a[0], U) if "64" in mods else self.setreg(a[0], U)
            if "64" in mods:
                lo, hi = self.c0.get(off), self.c0.get(off + 4)
                self.setpair(a[0], None if lo is None or hi is None else lo | (hi << 32))
            else:
                self.setreg(a[0], self.c0.get(off))
        elif base in ("S2R", "S2UR", "CS2R"):
            if base == "CS2R":
                return self.setpair(a[0], 0 if a[1] == "SRZ" else U)
            self.setreg(a[0], self.sregs.get(a[1]))
        elif base == "HFMA2" and "MMA" in mods and a[1] == "-RZ" and a[2] == "RZ":
            self.setreg(a[0], 0 if a[3] == "0" and a[4] == "0" else U)
        elif base in ("POPC", "UPOPC"):
            x = R(a[1])
            self.setreg(a[0], U if x is None else bin(x).count("1"))
        elif base in ("FLO", "UFLO"):
            x = R(a[1])
            self.setreg(a[0], U if x is None else (x.bit_length() - 1 if x else MASK32))
        elif base in ("IABS",):
            x = R(a[1])
            self.setreg(a[0], U if x is None else abs(s32(x)))
        elif base in ("IMNMX", "UIMNMX"):
            x, y, pv = R(a[1]), R(a[2]), self.pred(a[3])
            if None in (x, y, pv):
                return self.setreg(a[0], U)
            xs, ys = (x, y) if "U32" in mods else (s32(x), s32(y))
            self.setreg(a[0], min(xs, ys) if pv else max(xs, ys))
        elif base in ("I2F", "I2FP", "MUFU", "F2I") and self.int_float(ins, base, mods):
            pass
        elif base in ("VOTE", "VOTEU"):
            # a vote over a converged warp whose lanes agree: ALL/ANY of lane 0's predicate
            pv = self.pred(a[-1])
            if a[0].startswith(("R", "UR")):
                self.setreg(a[0], U)
            if len(a) > 2 and re.fullmatch(r"U?P\d", a[1]):
                self.setreg(a[1], pv)
        else:
            # everything else (floating point, loads, conversions, shuffles, stores, barriers):
            # destinations become unknown
            for d in self.dests(ins):
                if d.startswith(("desc", "[")):
                    continue
                if re.fullmatch(r"U?R\d+|U?P\d", d.replace(".reuse", "")):
                    if "64" in mods and d.startswith(("R", "UR")) and base in ("LDG", "LDS",
                                                                              "LDL", "LD"):
                        self.setpair(d, U)
                    elif "128" in mods and d.startswith("R") and base in ("LDG", "LDS", "LD"):
                        n = int(d.replace(".reuse", "")[1:])
                        for k in range(4):
                            self.setreg(f"R{n + k}", U)
                    else:
                        self.setreg(d, U)

    def int_float(self, ins: Instr, base: str, mods: set[str]) -> bool:
        """The float steps of the compiler's integer division (I2F.U32.RP, MUFU.RCP, F2I.TRUNC)
        on known integers, so that a quotient of known values stays known.  MUFU.RCP is taken as
        the correctly rounded reciprocal; the division's correction steps absorb the difference
        from the hardware's approximation.  False: not handled here."""
        a = ins.args
        if base in ("I2F", "I2FP") and not ({"S64", "U64", "F64"} & mods):
            x = self.reg(a[1])
            if x is None:
                return False
            v = x if ("U32" in mods or base == "I2FP" and "U32" in mods) else s32(x)
            if "S32" in mods:
                v = s32(x)
            f = struct.unpack("<f", struct.pack("<f", float(v)))[0]
            if "RP" in mods and f < v:
                f = math.nextafter(f, math.inf)
            self.setreg(a[0], struct.unpack("<I", struct.pack("<f", f))[0])
            return True
        if base == "MUFU" and "RCP" in mods:
            x = self.reg(a[1])
            if x is None:
                return False
            f = struct.unpack("<f", struct.pack("<I", x))[0]
            if f == 0 or not math.isfinite(f):
                return False
            r = struct.unpack("<f", struct.pack("<f", 1.0 / f))[0]
            self.setreg(a[0], struct.unpack("<I", struct.pack("<f", r))[0])
            return True
        if base == "F2I" and "TRUNC" in mods and not ({"S64", "U64", "F64"} & mods):
            x = self.reg(a[1])
            if x is None:
                return False
            f = struct.unpack("<f", struct.pack("<I", x))[0]
            if not math.isfinite(f):
                return False
            lo, hi = (0, MASK32) if "U32" in mods else (-(1 << 31), (1 << 31) - 1)
            self.setreg(a[0], max(lo, min(hi, int(f))))
            return True
        return False

    @staticmethod
    def lut3(x, y, z, lut):
        res = 0
        for bit in range(32):
            idx = (((x >> bit) & 1) << 2) | (((y >> bit) & 1) << 1) | ((z >> bit) & 1)
            res |= ((lut >> idx) & 1) << bit
        return res

    def isetp(self, a, mods):
        cmp = next(m for m in mods if m in ("LT", "LE", "GT", "GE", "EQ", "NE"))
        comb = "AND" if "AND" in mods else ("OR" if "OR" in mods else "XOR")
        x, y = self.reg(a[2]), self.reg(a[3])
        pc = self.pred(a[4])
        pex = self.pred(a[5]) if "EX" in mods and len(a) > 5 else None
        unsigned = "U32" in mods
        if None in (x, y, pc) or ("EX" in mods and pex is None):
            self.setreg(a[0], U)
            return self.setreg(a[1], U)
        xv, yv = (x, y) if unsigned else (s32(x), s32(y))
        ops = {"LT": xv < yv, "LE": xv <= yv, "GT": xv > yv, "GE": xv >= yv, "EQ": xv == yv,
               "NE": xv != yv}
        if "EX" in mods:
            eq = x == y
            lt, gt = xv < yv, xv > yv
            r = {"LT": lt or (eq and pex), "LE": lt or (eq and pex), "GT": gt or (eq and pex),
                 "GE": gt or (eq and pex), "EQ": eq and pex, "NE": (not eq) or pex}[cmp]
        else:
            r = ops[cmp]
        f = {"AND": lambda u, v: u and v, "OR": lambda u, v: u or v,
             "XOR": lambda u, v: u != v}[comb]
        self.setreg(a[0], f(r, pc))
        self.setreg(a[1], f(not r, pc))


def parse_params(spec: str) -> bytes:
    """'ptr:0x1000,i64:5,i32:17,f32:1.0,f64:2.0,bool:1' packed with C alignment."""
    out = bytearray()
    for item in filter(None, spec.split(",")):
        kind, _, val = item.partition(":")
        fmt, size = {"ptr": ("<Q", 8), "i64": ("<q", 8), "i32": ("<i", 4), "u32": ("<I", 4),
                     "f32": ("<f", 4), "f64": ("<d", 8), "bool": ("<B", 1)}[kind]
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
    ap.add_argument("--decide-at", action="append", default=[],
                    help="FILE:LINE=taken|fall for the data-dependent branches of that source "
                         "line (e.g. gfl_math.h:179=fall: DFL targets are not NaN)")
    ap.add_argument("--nvdisasm", default=default_nvdisasm())
    ap.add_argument("--per", type=float, default=0.0, help="divide the totals by this (elements)")
    ap.add_argument("--region", action="append", default=[],
                    help="NAME=LO-HI: also count the instructions at addresses [LO, HI)")
    args = ap.parse_args(argv)
    sass = subprocess.run([args.nvdisasm, "-c", "-gi", args.cubin], check=True,
                          capture_output=True, text=True).stdout
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
        sregs = {"SR_TID.X": 32 * w, "SR_TID.Y": 0, "SR_TID.Z": 0, "SR_CTAID.X": 0,
                 "SR_CTAID.Y": 0, "SR_CTAID.Z": 0, "SR_LANEID": 0, "SR_CgaCtaId": 0,
                 "SR_SWINHI": 0x10000}
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
    ops = sorted(((k[3:], v) for k, v in counts.items() if k.startswith("op:")),
                 key=lambda kv: -kv[1])
    print("  " + " ".join(f"{k}:{v / per:.2f}" for k, v in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
