"""``python -m gfl_ops``: what is installed here and which backend each op will run.

One screen for a bug report or a first check after ``pip install``: the versions, the record of
the build (the torch it was compiled against, its CUDA targets, its CPU instruction set), every
visible GPU and whether the CUDA kernels run on it, and each backend's state for CPU and CUDA
tensors with the automatic choice per op.  Prints only; imports nothing beyond gfl_ops and torch
(Triton only to read its version, when installed).
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import warnings

import torch

import gfl_ops
from gfl_ops import _cuda_archs, _extension, _registry, functional

OPS = ("qfl", "qfl_dense", "dfl", "integral")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _build_lines() -> list[str]:
    if not _extension.extension_loaded():
        return [f"compiled extension: NOT LOADED: {_extension.extension_error()}"]
    lines = ["compiled extension: loaded"]
    record = _extension.build_record()
    if record is None:
        return lines + ["  built by a setup.py that kept no record of its torch"]
    lines.append(f"  compiled against torch {record.TORCH_VERSION} (CUDA {record.TORCH_CUDA})")
    cuda = (
        _cuda_archs.describe(*_cuda_archs.recorded_targets())
        if _extension.cuda_compiled()
        else "not built"
    )
    lines.append(f"  CUDA kernels: {cuda}")
    lines.append(
        f"  CPU kernels: {_extension.cpu_kernel_isa()} build, "
        f"OpenMP {'on' if _extension.openmp_enabled() else 'off'}"
    )
    return lines


def _gpu_lines() -> list[str]:
    if not torch.cuda.is_available():
        return ["GPUs: none visible"]
    sass, ptx = _cuda_archs.recorded_targets()
    lines = []
    for index in range(torch.cuda.device_count()):
        capability = tuple(torch.cuda.get_device_capability(index))
        if not _extension.cuda_compiled():
            covered = "no CUDA kernels built"
        elif not (sass or ptx):
            covered = "CUDA targets not recorded"
        else:
            runs = _cuda_archs.runs_on(capability, sass, ptx)
            covered = "the CUDA kernels run on it" if runs else "the CUDA kernels DO NOT run on it"
        name = torch.cuda.get_device_name(index)
        lines.append(
            f"GPU cuda:{index}: {name}, compute capability "
            f"{_cuda_archs.arch_list_entry(capability)}: {covered}"
        )
    return lines


def _backend_lines() -> list[str]:
    lines = []
    for device_type in ("cpu", "cuda"):
        lines.append(f"backends for {device_type} tensors:")
        for name, state in gfl_ops.backend_status(device_type).items():
            lines.append(f"  {name:9} {state}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning is for training, not here
            choice = {op: _registry._auto_choice(device_type, op) for op in OPS}
        lines.append(
            "  automatic choice: " + ", ".join(f"{op} -> {name}" for op, name in choice.items())
        )
    return lines


def report() -> str:
    """The whole report, as printed by ``python -m gfl_ops``."""
    lines = [
        f"gfl-ops {gfl_ops.__version__} at {gfl_ops.__file__.rsplit('/', 1)[0]}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}",
        f"triton {_version('triton')}",
        *_build_lines(),
        *_gpu_lines(),
        f"value checks: {'on' if functional._value_checks else 'off'} "
        "(gfl_ops.set_value_checks, GFL_OPS_CHECK_VALUES)",
        *_backend_lines(),
    ]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
