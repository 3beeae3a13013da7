"""``nn.Module`` wrappers with mmdetection's constructor and forward signatures."""

from __future__ import annotations

import torch
from torch import nn

from gfl_ops import functional

__all__ = [
    "QualityFocalLoss",
    "DistributionFocalLoss",
    "Integral",
    "ProjectCheck",
    "project_problem",
]


def _pick_reduction(default: str, override: str | None) -> str:
    if override not in (None, "none", "mean", "sum"):
        raise ValueError(
            f"reduction_override must be None, 'none', 'mean' or 'sum', got {override!r}"
        )
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

    def __init__(
        self,
        use_sigmoid: bool = True,
        beta: float = 2.0,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
        backend: str | None = None,
    ) -> None:
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

    def forward(
        self,
        pred: torch.Tensor,
        target,
        weight: torch.Tensor | None = None,
        avg_factor: float | torch.Tensor | None = None,
        reduction_override: str | None = None,
    ) -> torch.Tensor:
        """pred (N, C); target ``(labels (N,), scores (N,))`` or dense (N, C); weight (N,)."""
        reduction = _pick_reduction(self.reduction, reduction_override)
        return self.loss_weight * functional.quality_focal_loss(
            pred,
            target,
            weight,
            reduction=reduction,
            avg_factor=avg_factor,
            beta=self.beta,
            activated=self.activated,
            backend=self.backend,
        )


class DistributionFocalLoss(nn.Module):
    """Distribution Focal Loss module (mmdetection ``DistributionFocalLoss``)."""

    def __init__(
        self, reduction: str = "mean", loss_weight: float = 1.0, backend: str | None = None
    ) -> None:
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.backend = backend

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        avg_factor: float | torch.Tensor | None = None,
        reduction_override: str | None = None,
    ) -> torch.Tensor:
        """pred (M, n+1) logits; target (M,) in [0, n]; weight (M,)."""
        reduction = _pick_reduction(self.reduction, reduction_override)
        return self.loss_weight * functional.distribution_focal_loss(
            pred, target, weight, reduction=reduction, avg_factor=avg_factor, backend=self.backend
        )


def project_problem(project: torch.Tensor, reg_max: int) -> str | None:
    """Why ``project`` is not the bin values the fused integral uses (None when it is).

    Args:
        project: an integral module's ``project`` buffer, any dtype or device.
        reg_max: the module's largest bin value n.
    """
    if project.is_meta:  # no values yet (deferred initialisation)
        return None
    # what mmdetection's buffer holds, cast as the module's buffers may have been (model.half())
    expected = torch.linspace(0, reg_max, reg_max + 1).to(project.dtype)
    if project.shape == expected.shape and torch.equal(project.detach().cpu(), expected):
        return None
    return (
        f"project must be linspace(0, {reg_max}, {reg_max + 1}), the bin values the fused "
        f"integral uses; got {project.detach().flatten()[:8].tolist()} of shape "
        f"{tuple(project.shape)}"
    )


class ProjectCheck:
    """Mixin for integral modules with a ``project`` buffer and a ``reg_max``: loading a state
    dict whose ``project`` is not the bin values is an error (the fused kernel would ignore it):
    the message goes to ``load_state_dict``'s error list, so it raises, strict or not, after
    loading the other entries, and the buffer keeps its value, as torch does for an entry of the
    wrong shape."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        project = state_dict.get(prefix + "project")
        problem = None
        # a shape mismatch is reported (and the entry skipped) by nn.Module itself
        if isinstance(project, torch.Tensor) and project.shape == self.project.shape:
            problem = project_problem(project, self.reg_max)
        if problem is None:
            super()._load_from_state_dict(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
            return
        error_msgs.append(f"{prefix}{problem}")
        # load everything else, but keep the buffer (load_state_dict raises after the walk)
        kept = self.project.detach().clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        with torch.no_grad():
            self.project.copy_(kept)


class Integral(ProjectCheck, nn.Module):
    """Decode 4 side distributions into distances (mmdetection ``Integral``).

    ``forward(x)``: x of shape (..., 4*(reg_max+1)) with at least one leading dimension
    (mmdetection's (N, 4*(n+1)) layout) or (..., 4, reg_max+1), floating logits -> (..., 4)
    expected distances in [0, reg_max], dtype of ``x``.  Any other last dimension is refused: a
    (B, 4*(n+1), A) channel-first head output (Ultralytics' layout) must be transposed first, or
    use :mod:`gfl_ops.integrations.ultralytics`.  During ONNX export the module lowers to
    Softmax + MatMul (:func:`gfl_ops.reference.integral`; the fused op has no ONNX symbolic).

    The ``project`` buffer is there for checkpoints only.  Like mmdetection's ``Integral`` the
    module registers a persistent buffer ``project`` = ``linspace(0, reg_max, reg_max + 1)``
    (the bin values), so its state dict has mmdetection's key ``<prefix>project`` and
    mmdetection GFL checkpoints load with ``strict=True`` both ways.  ``forward`` never reads
    it: every backend, and the ONNX path, multiplies by the bin indices 0..reg_max, which are
    exactly those values.  So loading a state dict whose ``project`` holds anything else is an
    error rather than silently ignored (:class:`ProjectCheck`): ``load_state_dict`` raises,
    with ``strict`` or without, and the buffer keeps its value.  Values written into the buffer
    directly are not checked, and are ignored like any others.
    """

    def __init__(self, reg_max: int = 16, backend: str | None = None) -> None:
        super().__init__()
        if isinstance(reg_max, bool) or not isinstance(reg_max, int) or reg_max < 1:
            raise ValueError(f"reg_max must be an integer >= 1, got {reg_max!r}")
        self.reg_max = reg_max
        self.backend = backend
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bins = self.reg_max + 1
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"x must be a torch.Tensor of shape (N, {4 * bins}) or (N, 4, {bins})"
                f", got {type(x).__name__}"
            )
        if x.dim() >= 2 and x.size(-1) == 4 * bins:
            lead = x.shape[:-1]
        elif x.dim() >= 2 and x.shape[-2:] == (4, bins):
            lead = x.shape[:-2]
        else:
            raise ValueError(
                f"x must have shape (N, 4*(reg_max+1)) = (N, {4 * bins}) or (N, 4, reg_max+1) = "
                f"(N, 4, {bins}) for reg_max={self.reg_max}, got {tuple(x.shape)} (last dimension "
                f"{x.size(-1) if x.dim() else 'none'}); a channel-first (B, 4*(reg_max+1), A) "
                "head output must be transposed to put the bins last"
            )
        # (during ONNX export functional.integral is the Softmax + MatMul reference formula)
        return functional.integral(x.reshape(-1, bins), backend=self.backend).reshape(*lead, 4)
