"""The ``reference`` backend: :mod:`gfl_ops.reference` formulas differentiated by autograd.

Runs on any device and dtype.  Low-precision predictions are upcast to float32 first, so this
backend returns the same dtypes as the fused ones (per-row losses in float32 for fp16/bf16) and is
usable as an AMP-safe fallback.
"""

from __future__ import annotations

import torch

from gfl_ops import reference


def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _ReferenceBackend:
    name = "reference"

    def unavailable_reason(self, device_type: str) -> str | None:
        return None

    def qfl(self, pred, labels, scores, beta, activated):
        return reference.quality_focal_loss(_opmath(pred), labels, scores, beta, activated)

    def qfl_dense(self, pred, target, beta, activated):
        return reference.quality_focal_loss_dense(_opmath(pred), target, beta, activated)

    def dfl(self, pred, target):
        return reference.distribution_focal_loss(_opmath(pred), target)

    def integral(self, pred):
        return reference.integral(_opmath(pred)).to(pred.dtype)


BACKEND = _ReferenceBackend()
