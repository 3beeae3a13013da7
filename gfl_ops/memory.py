"""The CPU operators' buffer cache: inspect it, size it, empty it.

A training step hands the loss a freshly allocated prediction and the C++ CPU kernels allocate a
fresh gradient of the same size.  glibc often serves such a block from pages that were never
mapped, and the first write to each 4 KiB page then costs a page fault: as much time as the
kernel itself at 40000 x 80 (benchmarks/README.md, "Fresh inputs").  The CPU operators therefore
take their own outputs (gradients, per-row losses, blocks of at least 256 KiB) from a small cache
(csrc/cpu/buffer_cache.h) that keeps a block when the tensor owning it dies and hands it to the
next call of about the same size.

The cache holds at most ``limit`` bytes of freed blocks (512 MiB by default; least recently
freed evicted first).  Set it with :func:`set_cpu_buffer_cache_limit` or, before ``import
gfl_ops``, the environment variable ``GFL_OPS_CPU_CACHE_MB`` (0 turns the cache off).  CUDA
tensors never use it (torch's CUDA caching allocator does the same job there).
"""

from __future__ import annotations

import os

import torch

from gfl_ops._extension import extension_error, extension_loaded

__all__ = ["cpu_buffer_cache_info", "set_cpu_buffer_cache_limit", "empty_cpu_buffer_cache"]

ENV_LIMIT_MB = "GFL_OPS_CPU_CACHE_MB"
_STAT_NAMES = ("hits", "misses", "cached_bytes", "cached_blocks", "limit_bytes")


def _ops():
    if not extension_loaded():
        raise RuntimeError(
            f"the CPU buffer cache lives in the compiled extension: {extension_error()}"
        )
    return torch.ops.gfl_ops


def cpu_buffer_cache_info() -> dict[str, int]:
    """Counters of the cache: ``hits`` / ``misses`` (requests of >= 256 KiB served from it or
    not), ``cached_bytes`` / ``cached_blocks`` (held now, not owned by any tensor) and
    ``limit_bytes``."""
    return dict(zip(_STAT_NAMES, _ops().cpu_buffer_cache_stats(), strict=True))


def set_cpu_buffer_cache_limit(limit_bytes: int) -> int:
    """Keep at most ``limit_bytes`` of freed blocks (0: off, freeing what is held); returns the
    previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0 (bytes), got {limit_bytes!r}")
    return int(_ops().set_cpu_buffer_cache_limit(limit_bytes))


def empty_cpu_buffer_cache() -> None:
    """Free every block the cache holds (blocks still owned by tensors are not affected)."""
    _ops().empty_cpu_buffer_cache()


def limit_from_environment() -> int | None:
    """The limit in bytes that ``GFL_OPS_CPU_CACHE_MB`` asks for, or None when it is unset."""
    raw = os.environ.get(ENV_LIMIT_MB)
    if raw is None or not raw.strip():
        return None
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0.0:
        raise ValueError(
            f"{ENV_LIMIT_MB} must be a number of MiB >= 0 (0 turns the CPU buffer "
            f"cache off), got {raw!r}"
        )
    return int(mb * 2**20)


if extension_loaded():
    _env_limit = limit_from_environment()
    if _env_limit is not None:
        set_cpu_buffer_cache_limit(_env_limit)
