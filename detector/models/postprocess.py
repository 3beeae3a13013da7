"""From dense head outputs to per-image detections (mmdetection's GFL test pipeline).

Per level: sigmoid scores, the top ``nms_pre`` (anchor, class) pairs whose score exceeds
``score_thr`` (mmdetection's ``filter_scores_and_topk``), boxes decoded for those pairs only and
clipped to the image.  Focal-loss variants then multiply by the centre-ness probability (as
mmdetection's ATSS).  Over all levels: rescale to original-image coordinates, drop boxes with a
side <= ``min_bbox_size``, class-wise NMS (``torchvision.ops.batched_nms``, one call for the whole
batch with per-image offsets) and the ``max_per_img`` best per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from detector.models.anchors import Anchors
from detector.models.coder import BoxCoder

__all__ = ["PostProcessConfig", "postprocess", "scale_factors_from_sizes"]


@dataclass
class PostProcessConfig:
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.6
    max_per_img: int = 100
    min_bbox_size: float = 0.0


def scale_factors_from_sizes(
    image_sizes: Sequence[tuple[int, int]], original_sizes: Sequence[tuple[int, int]]
) -> Tensor:
    """(B, 4) ``(sx, sy, sx, sy)`` = resized / original size, per image."""
    f = [(w / ow, h / oh, w / ow, h / oh) for (h, w), (oh, ow) in zip(image_sizes, original_sizes)]
    return torch.tensor(f, dtype=torch.float32)


def _as_scale_tensor(scale_factors, batch: int) -> Tensor:
    rows = []
    for s in scale_factors:
        s = torch.as_tensor(s, dtype=torch.float32).reshape(-1)
        if s.numel() == 1:
            s = s.expand(4)
        elif s.numel() == 2:
            s = s.repeat(2)
        elif s.numel() != 4:
            raise ValueError(
                "a scale factor must be a number, (sx, sy) or (sx, sy, sx, sy), got "
                f"{s.numel()} values"
            )
        rows.append(s)
    if len(rows) != batch:
        raise ValueError(f"got {len(rows)} scale factors for {batch} images")
    return torch.stack(rows)


@torch.no_grad()
def postprocess(
    cls: Tensor,
    reg: Tensor,
    centerness: Tensor | None,
    anchors: Anchors,
    coder: BoxCoder,
    cfg: PostProcessConfig,
    image_sizes: Sequence[tuple[int, int]],
    scale_factors: Sequence | Tensor | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
    with_distributions: bool = False,
) -> list[dict[str, Tensor]]:
    """Detections of a batch.

    Args:
        cls: (B, A, C) class logits; reg: (B, A, R) regression outputs; centerness: (B, A)
            logits or None; all concatenated over levels in anchor order.
        anchors: the batch's anchors; coder: decodes ``reg``.
        image_sizes: per image ``(h, w)`` of its content in the padded input (boxes are clipped
            to it).
        scale_factors: per image a number, ``(sx, sy)`` or (sx, sy, sx, sy): input / original
            size.  If None, taken from ``original_sizes``; if both are None, boxes stay in
            input coordinates.
        original_sizes: per image ``(h, w)`` of the original image; boxes are clipped to it.
        with_distributions: also return each kept box's per-side distribution (General
            representation only).

    Returns:
        Per image ``{'boxes': (K, 4) float32 xyxy, 'scores': (K,), 'labels': (K,) int64}`` and,
        when asked, ``'distributions': (K, 4, reg_max + 1)`` (softmax probabilities), sorted by
        decreasing score, K <= max_per_img.
    """
    batch, _, num_classes = cls.shape
    device = cls.device
    if len(image_sizes) != batch:
        raise ValueError(f"got {len(image_sizes)} image sizes for {batch} images")
    if with_distributions and not coder.use_dfl:
        raise ValueError("with_distributions needs a General-distribution variant ('gfl'/'dfl')")
    sizes = torch.tensor([list(s) for s in image_sizes], dtype=torch.float32, device=device)

    all_b, all_a, all_score, all_label = [], [], [], []
    start = 0
    for n in anchors.num_level_anchors:
        scores = cls[:, start : start + n].float().sigmoid().reshape(batch, -1)  # (B, n*C)
        k = min(cfg.nms_pre, scores.size(1))
        top_s, top_i = scores.topk(k, dim=1)  # top-k then threshold == threshold then top-k
        all_b.append(torch.arange(batch, device=device)[:, None].expand(-1, k))
        all_a.append(top_i // num_classes + start)
        all_label.append(top_i % num_classes)
        all_score.append(top_s)
        start += n
    img = torch.cat(all_b, dim=1).reshape(-1)
    anchor = torch.cat(all_a, dim=1).reshape(-1)
    label = torch.cat(all_label, dim=1).reshape(-1)
    score = torch.cat(all_score, dim=1).reshape(-1)
    keep = score > cfg.score_thr
    img, anchor, label, score = img[keep], anchor[keep], label[keep], score[keep]

    pred_reg = reg[img, anchor].float()
    boxes = coder.decode(
        anchors.boxes[anchor], anchors.strides[anchor], pred_reg, max_shape=sizes[img]
    )
    if centerness is not None:
        score = score * centerness[img, anchor].float().sigmoid()
    if scale_factors is None and original_sizes is not None:
        scale_factors = scale_factors_from_sizes(image_sizes, original_sizes)
    if scale_factors is not None:
        if not isinstance(scale_factors, Tensor) or scale_factors.shape != (batch, 4):
            scale_factors = _as_scale_tensor(scale_factors, batch)
        boxes = boxes / scale_factors.to(device=device, dtype=boxes.dtype)[img]
    if original_sizes is not None:
        osz = torch.tensor([list(s) for s in original_sizes], dtype=boxes.dtype, device=device)
        upper = torch.stack([osz[:, 1], osz[:, 0], osz[:, 1], osz[:, 0]], dim=-1)[img]
        boxes = torch.minimum(boxes.clamp(min=0), upper)
    wh = boxes[:, 2:] - boxes[:, :2]
    ok = (wh > cfg.min_bbox_size).all(dim=1)
    img, anchor, label, score, boxes, pred_reg = (
        img[ok],
        anchor[ok],
        label[ok],
        score[ok],
        boxes[ok],
        pred_reg[ok],
    )

    # one NMS for the batch: offsetting the class id by image keeps images apart
    keep = batched_nms(boxes, score, img * num_classes + label, cfg.nms_iou)  # by score, desc
    results = []
    kept_img = img[keep]
    for i in range(batch):
        sel = keep[kept_img == i][: cfg.max_per_img]
        det = {"boxes": boxes[sel], "scores": score[sel], "labels": label[sel]}
        if with_distributions:
            det["distributions"] = pred_reg[sel].reshape(-1, 4, coder.reg_max + 1).softmax(-1)
        results.append(det)
    return results
