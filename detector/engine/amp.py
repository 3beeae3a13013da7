"""Mixed precision: which ``amp`` modes fit a device, and the autocast context they run under.

``amp`` is ``'none'``, ``'bf16'`` (autocast to bfloat16, CPU or a GPU that supports it) or
``'fp16'`` (autocast to float16 with a ``GradScaler``, CUDA only).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["check_amp", "autocast_context"]


def autocast_context(device: torch.device, amp: str) -> AbstractContextManager:
    """``torch.autocast`` for ``amp`` in ``{'none', 'bf16', 'fp16'}`` (a no-op for 'none')."""
    if amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_amp(amp: str, device: torch.device) -> None:
    """Raise ``ValueError`` (with the mode to use instead) unless ``amp`` can run on ``device``."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 AMP needs a CUDA device; use --amp bf16 or --amp none on CPU")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --amp fp16")
