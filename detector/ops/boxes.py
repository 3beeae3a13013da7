"""Box arithmetic shared by the assigner, the losses and the post-processing.

All boxes are ``(x1, y1, x2, y2)`` floats in pixels unless a docstring says otherwise; all
functions broadcast over leading dimensions and are free of host synchronisation.
Formulas follow mmdetection (``bbox_overlaps``, ``distance2bbox``, ``bbox2distance``,
``DeltaXYWHBBoxCoder``) so that the detector reproduces its training targets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "box_centers",
    "aligned_iou",
    "aligned_giou",
    "giou_loss",
    "distance2bbox",
    "bbox2distance",
    "delta2bbox",
    "centerness_target",
]

# mmdetection's DeltaXYWHBBoxCoder defaults for ATSS (means are 0)
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)
# exp() of a width/height delta is clamped so a box is at most 1000/16 times its anchor
_MAX_WH_RATIO = abs(math.log(16.0 / 1000.0))


def box_centers(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 2) centres ``((x1 + x2) / 2, (y1 + y2) / 2)``."""
    return (boxes[..., :2] + boxes[..., 2:]) * 0.5


def _aligned_overlap(a: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area_a + area_b - overlap).clamp(min=eps)
    return overlap, union


def aligned_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of corresponding boxes: (..., 4), (..., 4) -> (...), in [0, 1].

    The union is floored at ``eps`` (mmdetection's ``bbox_overlaps``), so degenerate boxes give 0
    rather than NaN.
    """
    overlap, union = _aligned_overlap(a, b, eps)
    return overlap / union


def aligned_giou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of corresponding boxes: (..., 4), (..., 4) -> (...), in [-1, 1]."""
    overlap, union = _aligned_overlap(a, b, eps)
    iou = overlap / union
    enclose_wh = (
        torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    ).clamp(min=0)
    enclose = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return iou - (enclose - union) / enclose


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Unreduced GIoU loss ``1 - GIoU``: (P, 4), (P, 4) -> (P,)."""
    return 1.0 - aligned_giou(pred, target, eps)


def _clip(boxes: Tensor, max_shape: tuple[int, int] | Tensor | None) -> Tensor:
    """Clip xyxy boxes to an image of ``max_shape = (h, w)`` (a pair, or a (..., 2) tensor)."""
    if max_shape is None:
        return boxes
    if isinstance(max_shape, Tensor):
        hw = max_shape.to(boxes.dtype)
        upper = torch.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], dim=-1)
        return torch.minimum(boxes.clamp(min=0), upper)
    h, w = max_shape
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], dim=-1)


def distance2bbox(
    points: Tensor, distance: Tensor, max_shape: tuple[int, int] | Tensor | None = None
) -> Tensor:
    """Decode (left, top, right, bottom) distances from points into boxes.

    Args:
        points: (..., 2) ``(x, y)`` points.
        distance: (..., 4) non-negative distances, in the same unit as ``points``.
        max_shape: optional ``(h, w)`` to clip to.

    Returns:
        (..., 4) xyxy boxes.
    """
    boxes = torch.cat([points - distance[..., :2], points + distance[..., 2:]], dim=-1)
    return _clip(boxes, max_shape)


def bbox2distance(
    points: Tensor, boxes: Tensor, max_dis: float | None = None, eps: float = 0.1
) -> Tensor:
    """Distances (left, top, right, bottom) from points to the sides of boxes.

    Args:
        points: (..., 2); boxes: (..., 4) in the same unit.
        max_dis: when given, distances are clamped to ``[0, max_dis - eps]``: GFL clamps DFL
            targets to ``reg_max - 0.1`` so that they never reach the last bin edge.

    Returns:
        (..., 4) distances.
    """
    d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    if max_dis is not None:
        d = d.clamp(min=0, max=max_dis - eps)
    return d


def delta2bbox(
    anchors: Tensor,
    deltas: Tensor,
    stds: tuple[float, ...] = DELTA_STDS,
    max_shape: tuple[int, int] | Tensor | None = None,
) -> Tensor:
    """Decode ``(dx, dy, dw, dh)`` deltas relative to anchor boxes (mmdetection's delta coder).

    Used by the Dirac-delta (ATSS baseline) variants.  ``dw``/``dh`` are clamped so that
    ``exp()`` cannot overflow.

    Args:
        anchors: (..., 4) xyxy anchor boxes; deltas: (..., 4) raw regression outputs.

    Returns:
        (..., 4) xyxy boxes.
    """
    std = deltas.new_tensor(stds)
    d = deltas * std
    dxy, dwh = d[..., :2], d[..., 2:].clamp(min=-_MAX_WH_RATIO, max=_MAX_WH_RATIO)
    a_wh = anchors[..., 2:] - anchors[..., :2]
    a_ctr = anchors[..., :2] + 0.5 * a_wh
    ctr = a_ctr + a_wh * dxy
    half = 0.5 * a_wh * dwh.exp()
    return _clip(torch.cat([ctr - half, ctr + half], dim=-1), max_shape)


def centerness_target(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS/ATSS centre-ness of points inside their boxes: (P, 2), (P, 4) -> (P,) in [0, 1].

    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``; the ratios are clamped to [0, 1]
    and the denominators floored so points on or outside an edge give 0 instead of NaN.
    """
    d = bbox2distance(points, boxes)
    lr, tb = d[..., 0::2], d[..., 1::2]
    ratio_x = lr.min(dim=-1).values / lr.max(dim=-1).values.clamp(min=1e-12)
    ratio_y = tb.min(dim=-1).values / tb.max(dim=-1).values.clamp(min=1e-12)
    return (ratio_x.clamp(0, 1) * ratio_y.clamp(0, 1)).sqrt()
