"""The ``reference`` backend: :mod:`gfl_ops.reference` formulas differentiated by autograd.

Runs on any device and dtype.  Low-precision predictions are upcast to float32 first, so this
backend returns the same dtypes as the fused ones (per-row losses in float32 for fp16/bf16) and is
usable as an AMP-safe fallback.

Values that only the value checks reject (with them off: ``check_values=False``,
``gfl_ops.set_value_checks(False)``, inside ``torch.compile``) get the kernels' documented
behaviour here too, so that a call gives the same result whichever backend runs it, this one
included (it also runs every call whose targets require grad, and every call under a torch.func
transform or forward-mode AD): a DFL target outside [0, n] is clamped into it and a NaN target
gives its row a NaN loss and NaN gradients in bins 0 and 1, where mmdetection's formula would
index a bin that does not exist (an IndexError, or a device assert on a GPU); an activated QFL
probability outside [0, 1] is taken as the nearer of 0 and 1, loss and gradient alike, where
``binary_cross_entropy`` would raise.
"""

from __future__ import annotations

import torch

from gfl_ops import reference


def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _clamp(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """t clamped into [lo, hi] with the kernels' gradient: 0 outside, passed through at lo and
    hi themselves (valid values; torch.clamp's gradient is 0 there), NaN kept."""
    return torch.where(t > hi, hi, torch.where(t < lo, lo, t))


class _ProbabilityClamp(torch.autograd.Function):
    """p clamped into [0, 1] (NaN kept) with the gradient passed through unchanged: the kernels
    take a probability outside [0, 1] as the nearer bound, its gradient included
    (csrc/gfl_math.h's clamp_prob)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(p):
        return _clamp(p, 0.0, 1.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad

    @staticmethod
    def jvp(ctx, tangent):  # forward-mode AD (torch.func.jvp, forward_ad): passed through alike
        return tangent


def _on_probabilities(loss_of, pred: torch.Tensor) -> torch.Tensor:
    """``loss_of`` (the per-anchor activated QFL) of ``pred`` taken into [0, 1] as the kernels
    do (_ProbabilityClamp).  binary_cross_entropy refuses NaN, so a NaN probability computes on
    0 and its anchor's loss and its own gradient become NaN through a NaN square
    (d p^2 / dp = 2p), the other elements' gradients staying finite, as in the kernels."""
    pred = _opmath(pred)
    nan = pred.isnan()
    loss = loss_of(_ProbabilityClamp.apply(pred).masked_fill(nan, 0.0))
    return loss + torch.where(nan, pred, 0.0).square().sum(dim=1)


class _ReferenceBackend:
    name = "reference"

    def unavailable_reason(self, device_type: str) -> str | None:
        return None

    def qfl(self, pred, labels, scores, beta, activated):
        if activated:
            return _on_probabilities(
                lambda p: reference.quality_focal_loss(p, labels, scores, beta, True), pred
            )
        return reference.quality_focal_loss(_opmath(pred), labels, scores, beta, False)

    def qfl_dense(self, pred, target, beta, activated):
        if activated:
            return _on_probabilities(
                lambda p: reference.quality_focal_loss_dense(p, target, beta, True), pred
            )
        return reference.quality_focal_loss_dense(_opmath(pred), target, beta, False)

    def dfl(self, pred, target):
        pred = _opmath(pred)
        n = pred.size(1) - 1
        nan_rows = target.isnan()
        inside = _clamp(target, 0.0, float(n)).masked_fill(nan_rows, 0.0)
        loss = reference.distribution_focal_loss(pred, inside)
        # a NaN target: the kernels split it into bins (0, 1) with NaN weights (gfl_math.h's
        # dfl_split), so the row's loss and those two bins' gradients are NaN; NaN times the two
        # logits does the same here (torch.where gives the other rows an exact 0, even for inf)
        nan_part = target.to(pred.dtype) * pred[:, :2].sum(dim=1)
        return loss + torch.where(nan_rows, nan_part, 0.0)

    def integral(self, pred):
        return reference.integral(_opmath(pred)).to(pred.dtype)


BACKEND = _ReferenceBackend()
