"""What nvcc put into gfl_ops._C, checked with cuobjdump (no GPU needed, so CI runs it).

* Architectures: SASS (ELF) for every arch in the build's arch list and PTX for those marked
  ``+PTX``; the default, ``8.0;9.0+PTX`` in setup.py, gives SASS for sm_80 and sm_90 plus PTX for
  sm_90, which the driver JIT-compiles on newer GPUs.  Every csrc/cuda/*.cu file is checked, and
  every ELF arch must hold the same kernels.
* No kernel uses local memory or a stack frame (``cuobjdump -res-usage``: LOCAL:0 and STACK:0):
  a spill or a local array would put per-thread traffic into global memory.  With nvcc 13 both
  register spills and local arrays are counted in STACK (checked on a kernel built with
  -maxrregcount=24: STACK:328, LOCAL:0), so STACK:0 is the no-spill check.
* Every ``__global__`` kernel was compiled for the block size its launcher uses (kBlock in
  csrc/cuda/common.cuh; ``__launch_bounds__(kBlock)``, read back as EIATTR_MAX_THREADS) and its
  registers fit that block: REG <= 255 and at least one block of kBlock threads per SM, computed
  with the allocation rules of cuda_occupancy.h (registers go to warps in units of 256, the
  65536 registers of an SM split over 4 sub-partitions).  The theoretical occupancy is printed
  (``pytest -s`` or ``-rP``; or ``python tests/test_cuda_compiled.py`` for every instantiation).

Measured with nvcc 13.0 (torch 2.14.1+cu130), kBlock = 256, sm_80 / sm_90, after the issue #18
rewrite (re-read at a20d53a): qfl_kernel (200 instantiations) 32-58 / 31-59 registers on sm_80 /
sm_90; softmax_rows_tile_kernel 46-127 / 54-128; softmax_rows_warp_kernel (rows over 1 KB) 32-48
/ 40-64; scale_rows_kernel 40-48 / 46-48; no stack or local memory anywhere.  The occupancy
printed is at kBlock threads and static shared memory only: the rows tile kernels launch 32-128
threads with up to ~17 KB of dynamic shared memory per block (benchmarks/cuda_rows_kernel.md has
their occupancy).

Which extension: the one ``import gfl_ops`` loads (``gfl_ops._C.__file__``); the tests skip only
when it was built without CUDA (``gfl_ops._extension.cuda_compiled()`` is False).  Set
``GFL_OPS_COMPILED_EXTENSION=/path/to/_C....so`` to check another build instead (e.g. one built
out of tree), which then must contain CUDA code.  Expected archs: ``TORCH_CUDA_ARCH_LIST`` when it
is set (as for the build), else setup.py's default.  cuobjdump comes from the pip package
``nvidia-cuda-cuobjdump`` (requirements-dev.txt), else PATH / CUDA_HOME / the ``CUOBJDUMP``
variable; a CUDA build with no cuobjdump fails these tests instead of skipping them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EXTENSION_ENV = "GFL_OPS_COMPILED_EXTENSION"
CUOBJDUMP_PACKAGE = "nvidia-cuda-cuobjdump"
# What issue #17 asks of the default build: SASS for A100 and H100, PTX for the newest of them.
REQUIRED_DEFAULT_SASS = {"sm_80", "sm_90"}

# Per-SM limits of cuda_occupancy.h (CUDA 13) for the archs whose occupancy is computed.
SM_LIMITS = {
    arch: {
        "regs_per_sm": 65536,
        "regs_per_block": 65536,
        "reg_unit": 256,
        "sub_partitions": 4,
        "max_regs_per_thread": 255,
        "max_warps": 64,
        "max_blocks": 32,
        "smem_per_sm": smem,
        "smem_reserved": 1024,
        "smem_unit": 128,
    }
    for arch, smem in (("sm_80", 167936), ("sm_90", 233472))
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def blocks_per_sm(arch: str, regs: int, shared: int, block: int) -> dict | None:
    """Resident blocks of ``block`` threads per SM, and what limits them (None for an arch without
    a table).  The register rule is cudaOccMaxBlocksPerSMRegsLimit's."""
    lim = SM_LIMITS.get(arch)
    if lim is None:
        return None
    warps = -(-block // 32)
    regs_per_warp = _round_up(max(regs, 1) * 32, lim["reg_unit"])
    assumed_per_block = regs_per_warp * _round_up(warps, lim["sub_partitions"])
    if regs > lim["max_regs_per_thread"] or assumed_per_block > lim["regs_per_block"]:
        by_regs = 0
    else:
        per_partition = lim["regs_per_sm"] // lim["sub_partitions"] // regs_per_warp
        by_regs = per_partition * lim["sub_partitions"] // warps
    smem = _round_up(shared + lim["smem_reserved"], lim["smem_unit"])
    limits = {
        "registers": by_regs,
        "warps": lim["max_warps"] // warps,
        "blocks": lim["max_blocks"],
        "shared": lim["smem_per_sm"] // smem,
    }
    blocks = min(limits.values())
    return {
        "blocks": blocks,
        "occupancy_pct": 100 * blocks * warps // lim["max_warps"],
        "limited_by": "+".join(k for k, v in limits.items() if v == blocks),
    }


def parse_arch_list(text: str) -> tuple[set[str], set[str]]:
    """(SASS archs, PTX archs) of a TORCH_CUDA_ARCH_LIST such as ``8.0;9.0+PTX``."""
    sass, ptx = set(), set()
    for entry in re.split(r"[;,\s]+", text.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if m is None:
            raise ValueError(f"unsupported TORCH_CUDA_ARCH_LIST entry {entry!r} in {text!r}")
        arch = f"sm_{m[1]}{m[2]}{m[3]}"
        sass.add(arch)
        if m[4]:
            ptx.add(arch)
    return sass, ptx


def default_arch_list() -> str:
    m = re.search(r'^DEFAULT_ARCH_LIST\s*=\s*"([^"]*)"', (ROOT / "setup.py").read_text(), re.M)
    assert m, "setup.py has no DEFAULT_ARCH_LIST"
    return m[1]


def _arch_number(arch: str) -> int:
    return int(re.match(r"sm_(\d+)", arch)[1])


def kernel_template(mangled: str) -> str:
    """``gfl::cuda::qfl_kernel`` from an Itanium-mangled function name (no demangler needed);
    an unmangled (extern "C") name comes back as it is."""
    m = re.match(r"_Z(N?)", mangled)
    if m is None:
        return mangled
    nested, pos, parts = bool(m[1]), m.end(), []
    while pos < len(mangled) and mangled[pos].isdigit():
        digits = re.match(r"\d+", mangled[pos:])[0]
        pos += len(digits)
        ident = mangled[pos : pos + int(digits)]
        pos += int(digits)
        parts.append("(anonymous namespace)" if ident.startswith("_GLOBAL__N") else ident)
        if not nested:
            break
    return "::".join(parts) or mangled


def _without_signature(demangled: str) -> str:
    """``gfl::cuda::f<float, 8>`` from ``void gfl::cuda::f<float, 8>(float const*, ...)``."""
    depth = 0
    for i, ch in enumerate(demangled):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            demangled = demangled[:i]
            break
    return demangled.removeprefix("void ")


def demangle(names: list[str]) -> dict[str, str]:
    """Demangled names without their parameter lists, through c++filt when there is one (for
    messages and the report only)."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run(
        [cxxfilt], input="\n".join(names), capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    return {n: _without_signature(d) for n, d in zip(names, out)}


def find_cuobjdump() -> str | None:
    explicit = os.environ.get("CUOBJDUMP")
    if explicit:
        return explicit
    # the pip package installs nvidia/cu13/bin/cuobjdump (CUDA 12's: nvidia/cuda_cuobjdump/bin)
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(Path(root).glob("*/bin/cuobjdump"), reverse=True):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(home, "bin", "cuobjdump")
    return None


@dataclass
class Kernel:
    arch: str
    module: str  # the .cu file's stem
    name: str  # mangled
    res: dict[str, int]
    entry: bool = False  # a __global__ function (it has a .nv.info.<name> section)
    max_threads: int | None = None

    @property
    def template(self) -> str:
        return kernel_template(self.name)


@dataclass
class Compiled:
    path: Path
    elf: set[tuple[str, str]]  # (module, arch)
    ptx: set[tuple[str, str]]
    kernels: list[Kernel] = field(default_factory=list)


def _run(cuobjdump: str, flag: str, path: Path) -> str:
    proc = subprocess.run([cuobjdump, flag, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"cuobjdump {flag} {path} failed:\n{proc.stderr}"
    return proc.stdout


def inspect_binary(path: Path, cuobjdump: str) -> Compiled:
    listing = re.compile(r"^(?:ELF|PTX) file\s+\d+:\s+(.+)\.(sm_\w+)\.(?:cubin|ptx)\s*$", re.M)
    result = Compiled(
        path,
        set(listing.findall(_run(cuobjdump, "--list-elf", path))),
        set(listing.findall(_run(cuobjdump, "--list-ptx", path))),
    )
    arch = module = None
    by_key: dict[tuple[str, str], Kernel] = {}
    current: str | None = None
    for line in _run(cuobjdump, "--dump-resource-usage", path).splitlines():
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("identifier = "):
            module = Path(line.split("=", 1)[1].strip()).stem
        elif (m := re.match(r"^\s*Function (\S+):\s*$", line)) is not None:
            current = m[1]
        elif current is not None and "REG:" in line:
            res = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            by_key[(arch, current)] = Kernel(arch, module, current, res)
            current = None
    # EIATTR_MAX_THREADS of each kernel's .nv.info.<name> section: its __launch_bounds__
    arch = section = None
    want = False
    for line in _run(cuobjdump, "--dump-elf", path).splitlines():
        if want:
            if line.lstrip().startswith("Value:"):
                if (arch, section) in by_key:
                    by_key[(arch, section)].max_threads = int(line.split()[1], 0)
                want = False
        elif line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith(".nv.info."):
            section = line[len(".nv.info.") :].strip()
            if (arch, section) in by_key:
                by_key[(arch, section)].entry = True
        elif line.rstrip().endswith("EIATTR_MAX_THREADS"):
            want = True
    result.kernels = sorted(by_key.values(), key=lambda k: (k.arch, k.template, k.name))
    return result


def launcher_block_size() -> int:
    text = (CUDA_DIR / "common.cuh").read_text()
    m = re.search(r"constexpr\s+int\s+kBlock\s*=\s*(\d+)\s*;", text)
    assert m, "kBlock not found in csrc/cuda/common.cuh"
    return int(m[1])


def source_kernels() -> set[str]:
    """Names of the __global__ functions in csrc/cuda."""
    names = set()
    for src in sorted(CUDA_DIR.glob("*.cu*")):
        text = re.sub(r"//[^\n]*", "", src.read_text())
        names |= set(
            re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text)
        )
    return names


@functools.cache
def compiled() -> Compiled:
    override = os.environ.get(EXTENSION_ENV)
    if override:
        path = Path(override)
        assert path.is_file(), f"{EXTENSION_ENV}={override} is not a file"
    else:
        from gfl_ops import _extension

        if not _extension.extension_loaded():
            pytest.skip(
                f"gfl_ops._C is not loaded, no compiled CUDA code to inspect "
                f"(test_torch_integration reports why): {_extension.extension_error()}"
            )
        if not _extension.cuda_compiled():
            pytest.skip(
                "gfl_ops._C was built without CUDA kernels "
                "(gfl_ops._extension.cuda_compiled() is False): no device code to inspect"
            )
        path = Path(_extension._C.__file__)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.fail(
            f"cuobjdump not found, needed to inspect the CUDA kernels of {path}: install "
            f"the pip package {CUOBJDUMP_PACKAGE} (requirements-dev.txt), e.g. "
            f"pip install '{CUOBJDUMP_PACKAGE}>=13.2,<14', or set CUOBJDUMP"
        )
    return inspect_binary(path, cuobjdump)


def expected_archs() -> tuple[str, set[str], set[str]]:
    text = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list()
    return (text, *parse_arch_list(text))


def report(c: Compiled, block: int, every: bool = False) -> str:
    """A table of each kernel template's resources per arch (or of every instantiation)."""
    names = demangle(sorted({k.name for k in c.kernels})) if every else {}
    groups: dict[tuple[str, str], list[Kernel]] = {}
    for k in c.kernels:
        groups.setdefault((k.arch, names.get(k.name, k.template)), []).append(k)
    width = max(len(name) for _, name in groups)
    lines = [
        f"{c.path}  (kBlock={block}; occupancy = resident warps / max warps per SM)",
        f"{'arch':6} {'kernel':{width}} {'n':>3} {'REG':>7} {'STACK':>5} {'LOCAL':>5} "
        f"{'SHARED':>6} {'blocks/SM':>9} {'occupancy':>9}  limited by",
    ]

    def span(values: list) -> str:
        lo, hi = min(values), max(values)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    for (arch, name), ks in sorted(groups.items()):
        occ = [blocks_per_sm(arch, k.res["REG"], k.res.get("SHARED", 0), block) for k in ks]
        known = [o for o in occ if o]
        lines.append(
            f"{arch:6} {name:{width}} {len(ks):3} {span([k.res['REG'] for k in ks]):>7} "
            f"{span([k.res.get('STACK', 0) for k in ks]):>5} "
            f"{span([k.res.get('LOCAL', 0) for k in ks]):>5} "
            f"{span([k.res.get('SHARED', 0) for k in ks]):>6} "
            + (
                f"{span([o['blocks'] for o in known]):>9} "
                f"{span([o['occupancy_pct'] for o in known]) + '%':>9}  "
                f"{', '.join(sorted({o['limited_by'] for o in known}))}"
                if known
                else f"{'n/a':>9} {'n/a':>9}"
            )
        )
    return "\n".join(lines)


def test_default_arch_list_has_sass_for_a100_h100_and_ptx_for_the_newest():
    sass, ptx = parse_arch_list(default_arch_list())
    assert REQUIRED_DEFAULT_SASS <= sass, f"default arch list {default_arch_list()!r}"
    assert ptx == {max(sass, key=_arch_number)}, (
        f"default arch list {default_arch_list()!r}: PTX must be embedded for the newest arch "
        f"(and only it) so that newer GPUs can JIT it"
    )


def test_build_record_names_the_embedded_targets():
    """gfl_ops/_build_info.py's CUDA_SASS / CUDA_PTX, which decide at run time whether the CUDA
    kernels can run on a GPU (gfl_ops/_cuda_archs.py), say what the binary really holds."""
    if os.environ.get(EXTENSION_ENV):
        pytest.skip(f"{EXTENSION_ENV} names another build than the record describes")
    c = compiled()
    from gfl_ops import _build_info

    assert {f"sm_{t}" for t in _build_info.CUDA_SASS} == {a for _, a in c.elf}
    assert {f"sm_{t}" for t in _build_info.CUDA_PTX} == {a for _, a in c.ptx}


def test_architectures_embedded():
    c = compiled()
    text, sass, ptx = expected_archs()
    modules = {src.stem for src in CUDA_DIR.glob("*.cu")}
    assert modules, "no csrc/cuda/*.cu"
    for module in sorted(modules):
        got_sass = {a for m, a in c.elf if m == module}
        got_ptx = {a for m, a in c.ptx if m == module}
        assert got_sass == sass, (
            f"{module}.cu: SASS for {sorted(got_sass)}, expected "
            f"{sorted(sass)} from TORCH_CUDA_ARCH_LIST={text!r}"
        )
        assert got_ptx == ptx, (
            f"{module}.cu: PTX for {sorted(got_ptx)}, expected {sorted(ptx)} "
            f"from TORCH_CUDA_ARCH_LIST={text!r}"
        )
    # every SASS arch holds every kernel, and every __global__ of csrc/cuda is compiled
    per_arch: dict[str, set[str]] = {}
    for k in c.kernels:
        per_arch.setdefault(k.arch, set()).add(k.name)
    assert set(per_arch) == sass
    reference = per_arch[min(per_arch)]
    for arch, names in per_arch.items():
        assert names == reference, f"{arch} and {min(per_arch)} hold different kernels"
    templates = {kernel_template(n).rsplit("::", 1)[-1] for n in reference}
    assert source_kernels() <= templates, f"kernels missing from {c.path}"


def test_no_local_memory_or_stack():
    """STACK is the per-thread stack frame (register spills, local arrays, ABI calls), LOCAL other
    local-memory data.  Both live in global memory: a kernel here needs neither, so any non-zero
    value is a regression (e.g. a spill after a code change)."""
    c = compiled()
    assert c.kernels
    bad = [k for k in c.kernels if k.res.get("LOCAL", 0) or k.res.get("STACK", 0)]
    names = demangle([k.name for k in bad])
    assert not bad, "kernels with local memory or a stack frame:\n" + "\n".join(
        f"  {k.arch} {names[k.name]}: {k.res}" for k in bad
    )


def test_registers_fit_the_launch_block():
    c = compiled()
    block = launcher_block_size()
    for src in sorted(CUDA_DIR.glob("*.cu")):
        launches = re.findall(r"<<<([^>]*)>>>", src.read_text())
        for config in launches:
            parts = [p.strip() for p in config.split(",")]
            # kBlock, or the rows tile kernels' g.block, which rows_geometry keeps <= kBlock (the
            # emulated tests run every geometry it returns): a kernel that fits kBlock threads
            # fits fewer, and the driver refuses a launch above the compiled bound
            assert len(parts) >= 2 and parts[1] in ("kBlock", "g.block"), (
                f"{src.name}: launch <<<{config}>>> does not use kBlock (or the rows tile "
                "geometry's block) threads per block"
            )
    problems = []
    assert any(k.entry for k in c.kernels), "no __global__ function found in cuobjdump -elf"
    for k in c.kernels:
        regs = k.res["REG"]
        if k.entry and k.max_threads != block:
            problems.append(
                f"{k.arch} {k.name}: compiled for {k.max_threads} threads per block "
                f"(EIATTR_MAX_THREADS; None: no __launch_bounds__), launched with "
                f"kBlock={block}"
            )
        if regs > 255 or regs * block > 65536:
            problems.append(f"{k.arch} {k.name}: {regs} registers x {block} threads")
        occ = blocks_per_sm(k.arch, regs, k.res.get("SHARED", 0), block)
        if occ is not None and occ["blocks"] < 1:
            problems.append(f"{k.arch} {k.name}: no block of {block} threads fits an SM ({occ})")
    assert not problems, "\n".join(problems)
    print("\n" + report(c, block))


if __name__ == "__main__":  # every instantiation of the extension that gfl_ops loads (or the env)
    print(report(compiled(), launcher_block_size(), every=True))
