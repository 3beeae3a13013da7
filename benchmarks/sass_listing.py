"""Read a kernel's SASS: nvdisasm's listing of a cubin parsed into instructions, labels and
source locations (the input of benchmarks/sass_path_count.py's walk)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


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
    op: str  # full opcode with modifiers, e.g. "IMAD.WIDE.U32"
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
