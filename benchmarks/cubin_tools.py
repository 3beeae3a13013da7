"""Compile a CUDA source to a cubin and read it: SASS, resources, demangled names; and the
figures of the GPUs the kernel bounds are for (benchmarks/qfl_kernel_bounds.py and
benchmarks/rows_kernel_bounds.py).

No GPU is needed: nvcc (the CUDA_HOME torch builds with) compiles one .cu file of csrc/cuda alone
(no ATen), against torch's include path; cuobjdump and nvdisasm come from PATH, else from Triton's
bundle (the CUDA toolkit here ships neither).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]

# H100 SXM5 / H200 SXM: 132 SMs, 1980 MHz max boost (datasheets)
SMS, CLOCK_HZ = 132, 1.98e9
ISSUE = SMS * 4 * 32 * CLOCK_HZ  # thread issue slots / s (4 schedulers x 32 lanes per SM)
MUFU = SMS * 16 * CLOCK_HZ  # MUFU lane-operations / s (16 lanes per SM)
# bytes/s: the device-to-device copy measured on this workplace's GPUs, and the datasheet's HBM
COPY_BANDWIDTH = {
    "H100": {"measured": 3.0e12, "datasheet": 3.35e12},
    "H200": {"measured": 4.3e12, "datasheet": 4.8e12},
}


def run(cmd: list[str], **kw) -> str:
    """A command's stdout (it must succeed)."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def tool(name: str) -> str:
    """cuobjdump / nvdisasm: on PATH, else the one Triton bundles."""
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
    sys.exit(f"{Path(sys.argv[0]).stem}: {name} not found")


def materialize(sources: list[str], ref: str | None, dest: Path) -> Path:
    """The files `sources` (paths from the repository root) of the work tree (ref None) or of a
    commit, under dest."""
    for rel in sources:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(
            (ROOT / rel).read_bytes()
            if ref is None
            else subprocess.run(
                ["git", "show", f"{ref}:{rel}"], cwd=ROOT, check=True, capture_output=True
            ).stdout
        )
    return dest


def compile_cubin(src: Path, cu: str, arch: int, out: Path, flags: tuple[str, ...] = ()) -> Path:
    """nvcc -O3 -lineinfo ... [flags] -cubin of src/<cu> for sm_<arch>, with src/csrc/cuda,
    src/csrc and torch's headers on the include path."""
    import torch.utils.cpp_extension as ext

    nvcc = Path(ext.CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc"
    subprocess.run(
        [
            str(nvcc),
            *NVCC_FLAGS,
            *flags,
            "-gencode",
            f"arch=compute_{arch},code=sm_{arch}",
            "-cubin",
            "-o",
            str(out),
            str(src / cu),
            "-I",
            str(src / "csrc/cuda"),
            "-I",
            str(src / "csrc"),
            "-I",
            ext.include_paths()[0],
        ],
        check=True,
    )
    return out


def cuobjdump_sass(cubin: Path) -> str:
    """cuobjdump -sass (which runs nvdisasm: put where it is on PATH)."""
    path = str(Path(tool("nvdisasm")).parent) + os.pathsep + os.environ.get("PATH", "")
    return run([tool("cuobjdump"), "-sass", str(cubin)], env=dict(os.environ, PATH=path))


def nvdisasm_sass(cubin: Path) -> str:
    """nvdisasm -c -gi: the SASS with labels and source lines (benchmarks/sass_listing.py)."""
    return run([tool("nvdisasm"), "-c", "-gi", str(cubin)])


def resources(cubin: Path) -> dict[str, dict[str, int]]:
    """mangled kernel name -> {REG, STACK, SHARED, LOCAL} (cuobjdump -res-usage)."""
    res, name = {}, None
    for line in run([tool("cuobjdump"), "-res-usage", str(cubin)]).splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    return res


def demangle(names: list[str]) -> dict[str, str]:
    """mangled -> demangled (c++filt)."""
    out = run(["c++filt"], input="\n".join(names)).strip().split("\n")
    return dict(zip(names, out))


def occupancy(regs: int, block: int, smem: int = 0) -> tuple[int, float]:
    """(blocks per SM, resident warps / 64) on sm_90: registers per warp rounded up to 256, 16384
    per sub-partition, at most 64 warps and 32 blocks per SM, 228 KB of shared memory (1 KB per
    block reserved by the system)."""
    warps = math.ceil(block / 32)
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = (4 * (16384 // per_warp)) // warps if per_warp else 32
    by_threads = 2048 // block
    by_smem = (228 * 1024) // (smem + 1024)
    blocks = max(0, min(32, by_regs, by_threads, by_smem))
    return blocks, blocks * warps / 64
