"""One lane's values while a SASS path is walked: its registers, uniform registers and predicates,
constant bank 0 and special registers, the operands read from them, and what the integer and
predicate instructions do to them (benchmarks/sass_path_count.py walks the path).

A value is a known 32-bit integer (a predicate: a bool) or unknown (``U``, None): every loaded or
floating-point value is unknown, except the float steps of the compiler's integer division on
known integers.
"""

from __future__ import annotations

import math
import re
import struct

from benchmarks.sass_listing import Instr

MASK32 = 0xFFFFFFFF

U = None  # an unknown value


def u32(x):
    return None if x is None else x & MASK32


def s32(x):
    x &= MASK32
    return x - (1 << 32) if x & 0x80000000 else x


class Lane:
    """Lane 0's state of one warp, and the instructions' effect on it (``execute``); the walk
    (``benchmarks.sass_path_count.Machine``) decides which instructions run."""

    def __init__(self, const0: dict[int, int], sregs: dict[str, int]):
        self.c0 = const0
        self.sregs = sregs
        self.r: dict[int, int | None] = {}
        self.ur: dict[int, int | None] = {}
        self.p: dict[int, bool | None] = {}
        self.up: dict[int, bool | None] = {}

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

    # ---- execution: what an instruction does to the values
    def dests(self, ins: Instr) -> list[str]:
        a = ins.args
        op = ins.op
        if op.startswith(("ISETP", "UISETP", "FSETP", "DSETP", "HSETP2", "PLOP3", "UPLOP3")):
            return a[:2]
        if op.startswith(("ST", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "RED", "ATOM")):
            return []
        return a[:1]

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
        elif base == "P2R":  # Rd = (Rs & ~mask) | (P i as bit i, & mask): predicates saved
            src, mask = R(a[2]), R(a[3])
            bits = {i: self.pred(f"P{i}") for i in range(7) if mask is not None and mask >> i & 1}
            known = src is not None and mask is not None and None not in bits.values()
            packed = sum(int(b) << i for i, b in bits.items()) if known else 0
            self.setreg(a[0], (src & ~mask) | packed if known else U)
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
                    if (
                        "64" in mods
                        and d.startswith(("R", "UR"))
                        and base in ("LDG", "LDS", "LDL", "LD")
                    ):
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
        ops = {
            "LT": xv < yv,
            "LE": xv <= yv,
            "GT": xv > yv,
            "GE": xv >= yv,
            "EQ": xv == yv,
            "NE": xv != yv,
        }
        if "EX" in mods:
            eq = x == y
            lt, gt = xv < yv, xv > yv
            r = {
                "LT": lt or (eq and pex),
                "LE": lt or (eq and pex),
                "GT": gt or (eq and pex),
                "GE": gt or (eq and pex),
                "EQ": eq and pex,
                "NE": (not eq) or pex,
            }[cmp]
        else:
            r = ops[cmp]
        f = {"AND": lambda u, v: u and v, "OR": lambda u, v: u or v, "XOR": lambda u, v: u != v}[
            comb
        ]
        self.setreg(a[0], f(r, pc))
        self.setreg(a[1], f(not r, pc))
