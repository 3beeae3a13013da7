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
    "pip install --no-build-isolation -e .   (from the gfl-ops checkout), or reinstall the "
    "package: pip install --force-reinstall --no-deps --no-cache-dir <where gfl-ops came from>"
)


def build_record():
    """gfl_ops/_build_info.py, the record setup.py writes beside _C (the torch it was compiled
    against, ``TORCH_VERSION`` / ``TORCH_CUDA``, and its GPU targets, ``CUDA_SASS`` /
    ``CUDA_PTX``); None for a build without one (never built, or by an older setup.py)."""
    try:
        from gfl_ops import _build_info
    except ImportError:
        return None
    return _build_info


def _torch_mismatch() -> str | None:
    """Why _C must not be loaded into this torch, from :func:`build_record`; None when they match
    or there is no record (then the import itself is the check)."""
    record = build_record()
    if record is None:
        return None
    built = (record.TORCH_VERSION, record.TORCH_CUDA)
    running = (str(torch.__version__), torch.version.cuda)
    if built == running:
        return None
    # Checked before loading: a library built for other torch headers can load without a missing
    # symbol and still disagree with this torch about its types' layout.
    return (
        f"gfl_ops._C was compiled against torch {built[0]} (CUDA {built[1]}) but this is torch "
        f"{running[0]} (CUDA {running[1]}); an extension runs only with the torch it was "
        f"compiled for, so it was not loaded. {REBUILD_HINT}"
    )


def _load() -> tuple[object | None, str | None]:
    """(the loaded _C, None) or (None, why it is not loaded)."""
    mismatch = _torch_mismatch()
    if mismatch is not None:
        return None, mismatch
    try:
        return importlib.import_module("gfl_ops._C"), None
    except ImportError as exc:
        message = str(exc)
        if "No module named" in message:
            return None, f"the compiled extension gfl_ops._C is not built. {REBUILD_HINT}"
        if "undefined symbol" in message or "version" in message.lower():
            return None, (
                f"gfl_ops._C was built for another torch/CUDA than the installed torch "
                f"{torch.__version__} (CUDA {torch.version.cuda}): {message}. {REBUILD_HINT}"
            )
        return None, f"gfl_ops._C failed to load: {message}. {REBUILD_HINT}"
    except OSError as exc:  # a missing shared library (e.g. libcudart) surfaces as OSError
        return None, f"gfl_ops._C failed to load: {exc}. {REBUILD_HINT}"


_C, _error = _load()


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
