"""Pure-PyTorch formulas of the GFL losses: the oracle for tests and the baseline for benchmarks.

These follow mmdetection's ``gfocal_loss.py`` op for op (several eager passes, a ``nonzero`` host
sync, ``index_put`` writes), so the benchmarks compare against what users run today.  Two
deliberate differences, both bug fixes that do not change any in-range result:

* DFL with a target exactly equal to ``n`` (the last bin) uses bins ``(n-1, n)`` with weights
  ``(0, 1)`` instead of indexing the non-existent bin ``n+1``.
* Everything is differentiable with autograd and works in float64, so tests can compare our
  kernels against these formulas evaluated in float64.

Every function returns an *unreduced* loss: one value per anchor (QFL, summed over classes) or per
row (DFL), in the dtype of ``pred``.  Weighting and reduction live in :mod:`gfl_ops.functional`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "quality_focal_loss",
    "quality_focal_loss_dense",
    "distribution_focal_loss",
    "integral",
]


def quality_focal_loss(
    pred: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    beta: float = 2.0,
    activated: bool = False,
) -> torch.Tensor:
    """QFL with ``(labels, scores)`` targets, per anchor.

    Args:
        pred: (N, C) floating logits, or probabilities in [0, 1] when ``activated``.
        labels: (N,) integer class index per anchor; ``C`` (or any value outside [0, C)) means
            background.
        scores: (N,) floating IoU-quality target of the anchor's class, in [0, 1].
        beta: modulating exponent (paper's beta), >= 0.
        activated: ``pred`` already holds sigmoid probabilities.

    Returns:
        (N,) loss summed over classes, dtype of ``pred``.
    """
    if activated:
        prob = pred
        loss_fn = F.binary_cross_entropy
    else:
        prob = pred.sigmoid()
        loss_fn = F.binary_cross_entropy_with_logits
    # Negatives everywhere: target 0, modulating factor sigma^beta.
    loss = loss_fn(pred, torch.zeros_like(pred), reduction="none") * prob.pow(beta)
    num_classes = pred.size(1)
    pos = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
    pos_label = labels[pos].long()
    pos_score = scores[pos].to(pred.dtype)
    scale = (pos_score - prob[pos, pos_label]).abs().pow(beta)
    loss[pos, pos_label] = loss_fn(pred[pos, pos_label], pos_score, reduction="none") * scale
    return loss.sum(dim=1)


def quality_focal_loss_dense(
    pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0, activated: bool = False
) -> torch.Tensor:
    """QFL with a dense (N, C) soft target (mmdetection's ``quality_focal_loss_tensor_target``).

    Args:
        pred: (N, C) floating logits, or probabilities when ``activated``.
        target: (N, C) floating soft targets in [0, 1].
    Returns:
        (N,) loss summed over classes, dtype of ``pred``.
    """
    if activated:
        prob = pred
        loss_fn = F.binary_cross_entropy
    else:
        prob = pred.sigmoid()
        loss_fn = F.binary_cross_entropy_with_logits
    target = target.to(pred.dtype)
    return (loss_fn(pred, target, reduction="none") * (target - prob).abs().pow(beta)).sum(dim=1)


def distribution_focal_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL per row.

    Args:
        pred: (M, n+1) floating logits over the bins 0..n.
        target: (M,) floating distance in [0, n].
    Returns:
        (M,) loss, dtype of ``pred``.
    """
    n = pred.size(1) - 1
    target = target.to(pred.dtype)
    # floor, but a target of exactly n uses the last pair of bins (n-1, n) with weights (0, 1).
    left = target.floor().clamp(max=max(n - 1, 0)).long()
    right = left + 1
    weight_left = right.to(pred.dtype) - target
    weight_right = target - left.to(pred.dtype)
    return (
        F.cross_entropy(pred, left, reduction="none") * weight_left
        + F.cross_entropy(pred, right, reduction="none") * weight_right
    )


def integral(pred: torch.Tensor) -> torch.Tensor:
    """Softmax-integral decoding: expected bin index under ``softmax(pred)``.

    Args:
        pred: (..., n+1) floating logits.
    Returns:
        (...) expected value in [0, n], dtype of ``pred``.  Lowers to Softmax + MatMul, which is
        what ONNX / TensorRT export needs.
    """
    n_bins = pred.size(-1)
    project = torch.arange(n_bins, dtype=pred.dtype, device=pred.device)
    return F.softmax(pred, dim=-1) @ project
