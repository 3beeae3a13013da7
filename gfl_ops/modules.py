"""``nn.Module`` wrappers with mmdetection's constructor and forward signatures."""

from __future__ import annotations

import torch
from torch import nn

from gfl_ops import functional, reference

__all__ = ["QualityFocalLoss", "DistributionFocalLoss", "Integral"]


def _pick_reduction(default: str, override: str | None) -> str:
    if override not in (None, "none", "mean", "sum"):
        raise ValueError("reduction_override must be None, 'none', 'mean' or 'sum', got "
                         f"{override!r}")
    return override if override else default


class QualityFocalLoss(nn.Module):
    """Quality Focal Loss module (mmdetection ``QualityFocalLoss``).

    Args:
        use_sigmoid: must be True (QFL is defined on sigmoid outputs only).
        beta: modulating exponent, >= 0.
        reduction: default reduction, 'none' | 'mean' | 'sum'.
        loss_weight: multiplier applied to the loss.
        activated: predictions are probabilities rather than logits.
        backend: optional backend name (see :func:`gfl_ops.available_backends`).
    """

    def __init__(self, use_sigmoid: bool = True, beta: float = 2.0, reduction: str = "mean",
                 loss_weight: float = 1.0, activated: bool = False,
                 backend: str | None = None) -> None:
        super().__init__()
        if not use_sigmoid:
            raise ValueError("use_sigmoid must be True: QFL is only defined for sigmoid outputs")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        self.use_sigmoid = use_sigmoid
        self.beta = beta
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.activated = activated
        self.backend = backend

    def forward(self, pred: torch.Tensor, target, weight: torch.Tensor | None = None,
                avg_factor: float | torch.Tensor | None = None,
                reduction_override: str | None = None) -> torch.Tensor:
        """pred (N, C); target ``(labels (N,), scores (N,))`` or dense (N, C); weight (N,)."""
        reduction = _pick_reduction(self.reduction, reduction_override)
        return self.loss_weight * functional.quality_focal_loss(
            pred, target, weight, reduction=reduction, avg_factor=avg_factor, beta=self.beta,
            activated=self.activated, backend=self.backend)


class DistributionFocalLoss(nn.Module):
    """Distribution Focal Loss module (mmdetection ``DistributionFocalLoss``)."""

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0,
                 backend: str | None = None) -> None:
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.backend = backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor | None = None,
                avg_factor: float | torch.Tensor | None = None,
                reduction_override: str | None = None) -> torch.Tensor:
        """pred (M, n+1) logits; target (M,) in [0, n]; weight (M,)."""
        reduction = _pick_reduction(self.reduction, reduction_override)
        return self.loss_weight * functional.distribution_focal_loss(
            pred, target, weight, reduction=reduction, avg_factor=avg_factor,
            backend=self.backend)


class Integral(nn.Module):
    """Decode 4 side distributions into distances (mmdetection ``Integral``).

    ``forward(x)``: x (N, 4*(reg_max+1)) logits -> (N, 4) expected distances in [0, reg_max].
    During ONNX export it lowers to Softmax + MatMul (the fused op has no ONNX symbolic).
    """

    def __init__(self, reg_max: int = 16, backend: str | None = None) -> None:
        super().__init__()
        if not isinstance(reg_max, int) or reg_max < 1:
            raise ValueError(f"reg_max must be an integer >= 1, got {reg_max!r}")
        self.reg_max = reg_max
        self.backend = backend
        # kept for state-dict compatibility with mmdetection checkpoints
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bins = self.reg_max + 1
        if x.dim() < 1 or x.size(-1) % (4 * bins) != 0:
            raise ValueError(f"x must have shape (N, 4*(reg_max+1)) = (N, {4 * bins}), got "
                             f"{tuple(x.shape)}")
        x = x.reshape(-1, bins)
        if torch.onnx.is_in_onnx_export():
            out = reference.integral(x)
        else:
            out = functional.integral(x, backend=self.backend)
        return out.reshape(-1, 4)
