"""Build of gfl_ops._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA torch exist.

Environment:
  GFL_OPS_CPU_ONLY=1      never compile CUDA sources
  FORCE_CUDA=1            compile CUDA sources (fail if nvcc is missing)
  TORCH_CUDA_ARCH_LIST    GPU architectures, in torch's syntax; default "8.0;9.0+PTX": SASS for
                          sm_80 (A100) and sm_90 (H100/H200) plus PTX for compute_90, which the
                          driver JIT-compiles on newer GPUs (e.g. "8.9;9.0;10.0+PTX" for others)
  MAX_JOBS                parallel compile jobs (ninja)

The extension is compiled against the torch that is installed: ``pip install .`` finds it through
the in-tree build backend (build_backend/torch_matched_build.py), ``pip install
--no-build-isolation -e .`` imports it directly.  The wheel then requires exactly that torch, and
gfl_ops/_build_info.py records it for the check at import.  CUDA sources are compiled even on a
machine without a GPU, so CI catches CUDA compile errors.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# the oldest torch the sources compile against (csrc/torch_compat.h; `make test-oldest-torch`);
# build_backend/torch_matched_build.py's TORCH_REQUIREMENT says the same to pip
MIN_TORCH = (2, 1)


def _locate_cuda_home() -> None:
    """Point torch at a full CUDA toolkit before it guesses one.

    torch derives CUDA_HOME from ``which nvcc``; when nvcc is a wrapper script (as in
    /usr/local/bin here) that gives a folder without the CUDA headers.  Prefer an explicit
    CUDA_HOME / CUDA_PATH, then the standard /usr/local/cuda.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) of ``nvcc --version`` ("Cuda compilation tools, release 13.0, ..."); None
    when it cannot be run or read."""
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(m[1]), int(m[2])) if m else None


def _cuda_config(torch, cuda_home: str | None) -> tuple[bool, str]:
    """(compile CUDA?, reason) from the environment, the installed torch and the CUDA toolkit at
    ``cuda_home``.

    A toolkit of another major version than torch's CUDA is passed over, with the reason (torch's
    extension build refuses it and the whole install would fail: common with a system CUDA 13
    beside a torch built for CUDA 12); the C++ CPU kernels are built, and on GPUs the Triton
    backend runs.  FORCE_CUDA=1 builds anyway.
    """
    if _flag("GFL_OPS_CPU_ONLY"):
        return False, "GFL_OPS_CPU_ONLY=1"
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    found = nvcc is not None and os.path.exists(nvcc)
    if _flag("FORCE_CUDA"):
        if not found:
            sys.exit("gfl-ops build: FORCE_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if not found:
        return False, "nvcc not found (set CUDA_HOME to compile the CUDA kernels)"
    version = _nvcc_version(nvcc)
    torch_major = int(torch.version.cuda.split(".")[0])
    if version is not None and version[0] != torch_major:
        return False, (
            f"nvcc {version[0]}.{version[1]} at {cuda_home} is not torch's CUDA "
            f"{torch.version.cuda}, and torch builds no extension across CUDA major versions: "
            f"set CUDA_HOME to a CUDA {torch_major}.x toolkit for the CUDA kernels (meanwhile "
            "the Triton backend runs on GPUs), or FORCE_CUDA=1 to try anyway"
        )
    return True, f"nvcc at {cuda_home}, torch CUDA {torch.version.cuda}"


def _cuda_archs():
    """gfl_ops/_cuda_archs.py, loaded by path: the package itself is what is being built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gfl_ops_build_cuda_archs", os.path.join(ROOT, "gfl_ops", "_cuda_archs.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gencode_flags(arch_list: str) -> list[str]:
    """nvcc's -gencode flags for ``arch_list``, as torch's extension build derives them."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return _get_cuda_arch_flags()
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _nvcc_archs(cuda_home: str) -> set[str]:
    """The compute_XY targets this nvcc can compile ("75", "80", ...; empty if it won't say)."""
    import subprocess

    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return set()
    return set(re.findall(r"compute_(\d+)", out))


def _default_arch_list(torch, cuda_home: str) -> str:
    """DEFAULT_ARCH_LIST, plus an entry for each GPU this build machine shows that it would not
    run on (a T4, sm_75, say) and that nvcc can compile for (CUDA 13 dropped sm_70 and older:
    those GPUs run the Triton or reference backend instead, and the build says so)."""
    if not torch.cuda.is_available():
        return DEFAULT_ARCH_LIST
    archs = _cuda_archs()
    sass, ptx = archs.targets_from_gencode(_gencode_flags(DEFAULT_ARCH_LIST))
    supported = _nvcc_archs(cuda_home)
    capabilities = []  # the ones nvcc can compile for; extend_arch_list keeps the uncovered
    for index in range(torch.cuda.device_count()):
        capability = tuple(torch.cuda.get_device_capability(index))
        if f"{capability[0]}{capability[1]}" in supported:
            capabilities.append(capability)
        elif not archs.runs_on(capability, sass, ptx):
            print(
                f"gfl-ops build: cuda:{index} ({torch.cuda.get_device_name(index)}, compute "
                f"capability {archs.arch_list_entry(capability)}) is not a target of this nvcc; "
                "the CUDA kernels will not run on it"
            )
    return archs.extend_arch_list(DEFAULT_ARCH_LIST, capabilities, sass, ptx)


def _require_supported_torch(torch) -> None:
    """Stop with a message that names the torch found, rather than with compiler errors, when it
    is older than ``MIN_TORCH``."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if match and tuple(int(p) for p in match.groups()) < MIN_TORCH:
        wanted = ".".join(map(str, MIN_TORCH))
        raise SystemExit(
            f"gfl-ops needs torch >= {wanted}; this environment has torch {torch.__version__}. "
            f"Upgrade it (pip install 'torch>={wanted}') and install gfl-ops again."
        )


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    _require_supported_torch(torch)
    with_cuda, reason = _cuda_config(torch, CUDA_HOME)
    # The DEFAULT build of the CPU kernels is listed before the AVX2 one so that the linker keeps
    # the portable copies of shared inline functions.
    sources = [
        "csrc/ops.cpp",
        "csrc/autograd.cpp",
        "csrc/python_module.cpp",
        "csrc/cpu/ops_cpu.cpp",
        "csrc/cpu/buffer_cache.cpp",
        "csrc/cpu/kernels_default.cpp",
        "csrc/cpu/kernels_avx2.cpp",
        "csrc/cpu/kernels_avx512.cpp",
    ]
    # -Wno-psabi: GCC notes that AVX2 lambdas in at::vec change the ABI; they never cross a TU.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wno-psabi"]
    link_flags = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is a header template around `#pragma omp parallel`: without -fopenmp
        # in *our* compile it silently runs on one thread.  torch's Linux wheels use libgomp,
        # which is what GCC's -fopenmp links, so both share one thread pool.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list(torch, CUDA_HOME)
        sources += ["csrc/cuda/ops_cuda.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("GFL_WITH_CUDA", None))
    print("gfl-ops build configuration:")
    print(f"  torch          {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA kernels   {'yes' if with_cuda else 'no'} ({reason})")
    if with_cuda:
        print(f"  CUDA arch list {os.environ['TORCH_CUDA_ARCH_LIST']}")
    print(f"  OpenMP         {'yes' if link_flags else 'no'}")
    print(f"  MAX_JOBS       {os.environ.get('MAX_JOBS', 'default')}")
    print(f"  ninja          {'yes' if shutil.which('ninja') else 'no'}")
    print(f"  sources        {len(sources)} files")
    if with_cuda:
        return [
            CUDAExtension(
                "gfl_ops._C",
                sources,
                define_macros=define_macros,
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
                },
                extra_link_args=link_flags,
            )
        ]
    return [
        CppExtension(
            "gfl_ops._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


BUILD_INFO = "_build_info.py"


def _build_info_text(torch, with_cuda: bool) -> str:
    sass, ptx = (), ()  # empty: no CUDA code, or not known (then nothing is checked at run time)
    if with_cuda:
        try:
            flags = _gencode_flags(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
            sass, ptx = _cuda_archs().targets_from_gencode(flags)
        except Exception as exc:  # noqa: BLE001 - the record must not fail a finished build
            print(f"gfl-ops build: the CUDA targets are not recorded ({exc})")
    return (
        '"""Written by setup.py when gfl_ops._C is compiled: the torch it was compiled against\n'
        "and the GPU targets of its CUDA kernels.\n\n"
        "gfl_ops._extension compares the torch with the one being imported before it loads _C\n"
        "(an extension runs only with the torch it was built for); gfl_ops._cuda_archs checks\n"
        'the targets against the visible GPUs."""\n\n'
        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        f"TORCH_CUDA = {torch.version.cuda!r}\n"
        f"CUDA_SASS = {sass!r}\n"
        f"CUDA_PTX = {ptx!r}\n"
    )


# After a failed compile that included the CUDA sources: the way to install without them.  (The
# CUDA kernels are compiled with nvcc 13.0 in CI; other toolkits, CUDA 12 for torch 2.1-2.6 above
# all, are not tried there: README, "Building".)
CUDA_BUILD_FAILED_HINT = (
    "gfl-ops build failed. If the errors above are in csrc/cuda (nvcc), install without the CUDA "
    "kernels: GFL_OPS_CPU_ONLY=1 pip install --no-cache-dir <gfl-ops>. On GPUs the Triton "
    "backend (torch >= 2.6) or the reference formulas then run; python -m gfl_ops says which. "
    "Please report the nvcc version (nvcc --version) with the errors."
)


def _cmdclass():
    import torch
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(no_python_abi_suffix=False)

    class BuildExtensionRecordingTorch(base):
        """torch's BuildExtension, then gfl_ops/_build_info.py beside the compiled _C."""

        def run(self):
            with_cuda = any(
                name == "GFL_WITH_CUDA" for ext in self.extensions for name, _ in ext.define_macros
            )
            try:
                super().run()
            except Exception:
                if with_cuda:
                    print(CUDA_BUILD_FAILED_HINT, file=sys.stderr)
                raise
            text = _build_info_text(torch, with_cuda)
            # beside the _C this run made: the checkout (editable, build_ext --inplace) or the
            # build folder the wheel is packed from (never both: a wheel build must not relabel
            # a checkout's in-place _C)
            folder = os.path.join(ROOT if self.inplace else self.build_lib, "gfl_ops")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, BUILD_INFO), "w") as handle:
                handle.write(text)

    return {"build_ext": BuildExtensionRecordingTorch}


def _install_requires() -> list[str]:
    """The torch this build compiles against, exactly: the extension loads into no other (pip
    then keeps, or installs, the matching torch beside the wheel).  Local labels such as +cu130
    are not part of the pin (pip matches 2.14.1 to 2.14.1+cu130)."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy"]


# Run as a script (pip / setuptools' build backend run it as __main__); importable for the tests.
if __name__ == "__main__":
    _locate_cuda_home()
    setup(
        # The distribution is gfl_ops alone.  detector/ (like benchmarks/) runs from a checkout,
        # `python -m detector.main_job` from the repository root; listed here it would install a
        # top-level package named `detector` into every environment that installs gfl-ops.
        packages=find_packages(include=["gfl_ops", "gfl_ops.*"]),
        install_requires=_install_requires(),
        ext_modules=_extensions(),
        cmdclass=_cmdclass(),
    )
