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
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


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


_locate_cuda_home()


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _cuda_config(torch) -> tuple[bool, str]:
    """(compile CUDA?, reason) from the environment and the installed torch."""
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("GFL_OPS_CPU_ONLY"):
        return False, "GFL_OPS_CPU_ONLY=1"
    nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if _flag("FORCE_CUDA"):
        if not nvcc:
            sys.exit("gfl-ops build: FORCE_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if not nvcc:
        return False, "nvcc not found (set CUDA_HOME to compile the CUDA kernels)"
    return True, f"nvcc at {CUDA_HOME}, torch CUDA {torch.version.cuda}"


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda, reason = _cuda_config(torch)
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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
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


def _build_info_text(torch) -> str:
    return (
        '"""Written by setup.py when gfl_ops._C is compiled: the torch it was compiled against.\n\n'
        "gfl_ops._extension compares it with the torch being imported before it loads _C: an\n"
        'extension runs only with the torch it was built for."""\n\n'
        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        f"TORCH_CUDA = {torch.version.cuda!r}\n"
    )


def _cmdclass():
    import torch
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(no_python_abi_suffix=False)

    class BuildExtensionRecordingTorch(base):
        """torch's BuildExtension, then gfl_ops/_build_info.py beside the compiled _C."""

        def run(self):
            super().run()
            text = _build_info_text(torch)
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


setup(
    # The distribution is gfl_ops alone.  detector/ (like benchmarks/) runs from a checkout,
    # `python -m detector.main_job` from the repository root; listed here it would install a
    # top-level package named `detector` into every environment that installs gfl-ops.
    packages=find_packages(include=["gfl_ops", "gfl_ops.*"]),
    install_requires=_install_requires(),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
