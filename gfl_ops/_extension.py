"""Loading of the compiled extension ``gfl_ops._C``.

Importing ``_C`` registers the C++/CUDA operators under ``torch.ops.gfl_ops``.  When it cannot be
loaded (never built, or built against another torch / CUDA), ``gfl_ops`` still imports, the
reference (and Triton) backends keep working, and the reason plus the rebuild command are kept
in :func:`extension_error` and shown by any request for the ``cpu`` / ``cuda`` backends.
"""

from __future__ import annotations

import importlib

import torch

REBUILD_HINT = (
    "Rebuild it against the installed torch with: "
    "pip install --no-build-isolation -e .   (from the gfl-ops checkout)"
)

_error: str | None = None
_C = None

try:
    _C = importlib.import_module("gfl_ops._C")
except ImportError as exc:
    message = str(exc)
    if "No module named" in message:
        _error = f"the compiled extension gfl_ops._C is not built. {REBUILD_HINT}"
    elif "undefined symbol" in message or "version" in message.lower():
        _error = (
            f"gfl_ops._C was built for another torch/CUDA than the installed torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}): {message}. {REBUILD_HINT}"
        )
    else:
        _error = f"gfl_ops._C failed to load: {message}. {REBUILD_HINT}"
except OSError as exc:  # a missing shared library (e.g. libcudart) surfaces as OSError
    _error = f"gfl_ops._C failed to load: {exc}. {REBUILD_HINT}"


def extension_loaded() -> bool:
    """True when the C++ operators are registered in ``torch.ops.gfl_ops``."""
    return _C is not None


def extension_error() -> str | None:
    """Why ``gfl_ops._C`` could not be loaded, with the rebuild command; None when loaded."""
    return _error


def cuda_compiled() -> bool:
    """True when the loaded extension contains the CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def cpu_kernel_isa() -> str | None:
    """Which build of the CPU kernels runs here: "avx512", "avx2" or "default" (None without
    _C).  It follows torch's own choice (``ATEN_CPU_CAPABILITY`` narrows both)."""
    return getattr(_C, "CPU_ISA", None) if _C is not None else None


def openmp_enabled() -> bool:
    """True when the CPU kernels were compiled with OpenMP, i.e. ``at::parallel_for`` in them
    uses torch's intra-op threads (without it they run on one thread)."""
    return _C is not None and bool(getattr(_C, "OPENMP", False))
