"""Every launch mode of the CUDA kernels, counted on paper: ``results/paper-bounds-sm90.csv``.

    make paper-bounds        # python -m benchmarks.paper_bounds (no GPU: nvcc + cuobjdump, ~4 min)

Counts the issue slots per element of every case -- DFL and the integral at every bin count
2..64, QFL's two target forms x logits / probabilities x beta 2 / 0 / 1 / general at 20, 80 and
365 classes; each forward, fused (forward writing the gradient) and backward; fp32, bf16,
fp16 -- in the sm_90 SASS with the same code as the two bounds scripts
(``rows_kernel_bounds.measure``, ``qfl_kernel_bounds.after_case``) and writes, per case: bytes
per element, slots and MUFU per element, registers, occupancy, the bandwidth the issue rate
allows (``issue_bound_GBps``, at 132 SMs and 1.98 GHz: H100 SXM and H200 alike) and, for the
rows kernels, the bytes of loads a SM has in flight at the kernel's peak (Little's law: a SM
must keep about bandwidth x latency / SMs in flight).  The file records the SHA-256 of the code
of the CUDA sources it was counted from (comments and layout left out);
tests/test_kernel_sweep.py fails when it has changed since, so the figures a GPU run is compared
with (benchmarks/kernel_sweep.py) are always the code's.

Bytes per element (``rows_kernel_bounds.bytes_per_element``, ``qfl_kernel_bounds.mode_bytes``):
pred read, gradient written when there is one, the per-row target / label / score / row scale
/ loss over the row's elements.  QFL's labels cases count 2% positive anchors' label patch.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_CSV = ROOT / "benchmarks" / "results" / "paper-bounds-sm90.csv"
# every file the paper figures depend on: the kernels and what they include
CUDA_SOURCES = [
    "csrc/gfl_math.h",
    "csrc/cuda/common.cuh",
    "csrc/cuda/launchers.h",
    "csrc/cuda/softmax_rows_kernel.cuh",
    "csrc/cuda/softmax_rows.cu",
    "csrc/cuda/qfl_kernel.cuh",
    "csrc/cuda/qfl.cu",
]
ROWS_BINS = range(2, 65)
ROWS_OPS = ("integral", "dfl")
MODES = ("fwd", "fused", "bwd")
DTYPES = ("fp32", "bf16", "fp16")
QFL_CLASSES = (20, 80, 365)
# QFL's compiled beta modes: (label, the kernel's template value, the beta passed)
QFL_BETAS = (("2", 2, 2.0), ("0", 0, 0.0), ("1", 1, 1.0), ("general", 3, 1.5))
QFL_POSITIVES = 0.02
FIELDS = [
    "kernel",
    "op",
    "mode",
    "dtype",
    "size",
    "activated",
    "beta",
    "bytes_per_elem",
    "slots_per_elem",
    "mufu_per_elem",
    "regs",
    "occupancy",
    "inflight_bytes_per_sm",
    "issue_bound_GBps",
    "sources_sha256",
    "commit",
]


def code_only(text: str) -> str:
    """C++ source without its comments and with runs of whitespace as one space: what the
    compiler sees, so that a comment edit does not date the paper figures."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":  # a string or character literal, escapes and all
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else n
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
            out.append(" ")
        else:
            out.append(c)
            i += 1
    return re.sub(r"\s+", " ", "".join(out)).strip()


def sources_sha256(root: Path = ROOT) -> str:
    """SHA-256 over the code (code_only) of the CUDA sources the paper figures are counted
    from."""
    h = hashlib.sha256()
    for rel in CUDA_SOURCES:
        h.update(rel.encode() + b"\0" + code_only((root / rel).read_text()).encode() + b"\0")
    return h.hexdigest()


def read_paper(path: Path = PAPER_CSV) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# paper: the bounds of every case, from the SASS


def head_commit() -> str:
    """The short commit of the checkout (csvio.git_commit: $GFL_BENCH_COMMIT where there is
    no .git, as on the lent GPU machine)."""
    from benchmarks.csvio import git_commit

    return git_commit()[0][:7]


def _rows_paper(sha: str, commit: str) -> Iterable[dict]:
    from benchmarks import rows_kernel_bounds as rkb
    from benchmarks.cubin_tools import ISSUE, occupancy

    with tempfile.TemporaryDirectory(prefix="sweep_rows_") as tmp:
        src = rkb.materialize(rkb.SOURCES, None, Path(tmp))
        sass, res, decide_at = rkb.compiled_sm90(src)
        kernel_src = (src / "csrc/cuda/softmax_rows_kernel.cuh").read_text()
    in_flight = int(re.search(r"constexpr int kInFlight = (\d+);", kernel_src).group(1))
    for bins in ROWS_BINS:
        for dname in DTYPES:
            mangled, s = rkb.DTYPES[dname]
            for op in ROWS_OPS:
                for mode in MODES:
                    slots, mufu, _half, regs, smem, block, _occ = rkb.measure(
                        op, mode, dname, mangled, s, bins, True, sass, res, decide_at
                    )
                    blocks, occ = occupancy(regs, block, smem)
                    bpe = rkb.bytes_per_element(op, mode, s, bins)
                    yield {
                        "kernel": "rows",
                        "op": op,
                        "mode": mode,
                        "dtype": dname,
                        "size": bins,
                        "activated": "",
                        "beta": "",
                        "bytes_per_elem": f"{bpe:.4f}",
                        "slots_per_elem": f"{slots:.3f}",
                        "mufu_per_elem": f"{mufu:.3f}",
                        "regs": regs,
                        "occupancy": f"{occ:.4f}",
                        # load_tile: kInFlight 16-byte loads per thread, every resident block
                        "inflight_bytes_per_sm": blocks * block * in_flight * 16,
                        "issue_bound_GBps": f"{ISSUE / slots * bpe / 1e9:.1f}",
                        "sources_sha256": sha,
                        "commit": commit,
                    }


def _qfl_paper(sha: str, commit: str) -> Iterable[dict]:
    from benchmarks import qfl_kernel_bounds as qkb
    from benchmarks.cubin_tools import ISSUE, MUFU, compile_cubin, occupancy

    with tempfile.TemporaryDirectory(prefix="sweep_qfl_") as tmp:
        cubin = compile_cubin(
            qkb.ROOT, qkb.QFL_CU, 90, Path(tmp) / "qfl_sm90.cubin", qkb.HALF_FLAGS
        )
        listing = qkb.Listing(cubin, 90)
    for c in QFL_CLASSES:
        for form in ("labels", "dense"):
            for activated in (False, True):
                for label, template_beta, _beta in QFL_BETAS:
                    for dname in DTYPES:
                        size = qkb.STORAGE[dname][1]
                        # dense targets in float32 with 16-bit pred, as detectors pass them
                        f = "dense-opmath" if form == "dense" and size == 2 else form
                        for mode in MODES:
                            grad = mode != "fwd"
                            k = qkb.after_case(listing, dname, f, c, grad, activated, template_beta)
                            eff, mufu, _rate = qkb.element_rate(k, c)
                            if k.get("patch"):  # positives run the label word's patch
                                eff += 100 * QFL_POSITIVES * k["patch"] * 32 * 0.01 / c
                            rate = min(ISSUE / eff, MUFU / mufu) if mufu else ISSUE / eff
                            bpe = qkb.mode_bytes(form, grad, size, c)
                            yield {
                                "kernel": "qfl",
                                "op": f"qfl_{form}",
                                "mode": mode,
                                "dtype": dname,
                                "size": c,
                                "activated": int(activated),
                                "beta": label,
                                "bytes_per_elem": f"{bpe:.4f}",
                                "slots_per_elem": f"{eff:.3f}",
                                "mufu_per_elem": f"{mufu:.3f}",
                                "regs": k["regs"],
                                "occupancy": f"{occupancy(k['regs'], 256)[1]:.4f}",
                                "inflight_bytes_per_sm": "",
                                "issue_bound_GBps": f"{rate * bpe / 1e9:.1f}",
                                "sources_sha256": sha,
                                "commit": commit,
                            }


def write_paper(path: Path = PAPER_CSV) -> int:
    sha, commit = sources_sha256(), head_commit()
    started = time.perf_counter()
    rows = list(_qfl_paper(sha, commit))
    print(f"QFL: {len(rows)} cases ({time.perf_counter() - started:.0f} s)", flush=True)
    rows += list(_rows_paper(sha, commit))
    print(f"all: {len(rows)} cases ({time.perf_counter() - started:.0f} s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return 0


def main() -> int:
    return write_paper()


if __name__ == "__main__":
    sys.exit(main())
