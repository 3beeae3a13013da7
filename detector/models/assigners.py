"""Adaptive Training Sample Selection (ATSS, Zhang et al. 2020), vectorised and batched.

For every ground truth g:

1. on each pyramid level take the ``topk`` anchors whose centres are nearest to g's centre
   (fewer when the level has fewer anchors) -- the candidates;
2. threshold = mean + unbiased standard deviation of the candidates' IoUs with g;
3. a candidate is positive for g when its IoU >= threshold and its centre lies strictly inside g
   (smallest distance to a side > 0.01).

An anchor positive for several ground truths goes to the one with the highest IoU.  The rule is
mmdetection's ``ATSSAssigner`` with two deliberate refinements that make it deterministic:
equal centre distances are broken by the lower anchor index (a stable sort; ``topk`` breaks them
arbitrarily, and on a regular anchor grid they are common), and equal IoUs by the lower ground
truth index.  With a single candidate the unbiased std is undefined (NaN), so such a ground truth
gets no positive, as in mmdetection.

There is no Python loop over ground truths or anchors; the loop over the (five) levels remains.
Only the candidates' IoUs are computed -- (B, G, K) with K = topk * levels -- rather than the full
(A, G) IoU matrix; the centre distances are (B, G, A_l) per level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detector.ops.boxes import aligned_iou, box_centers

__all__ = ["atss_assign", "atss_assign_batched"]

_INSIDE_EPS = 0.01


def _smallest_k(d: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest values along the last dim and their indices, equal values ordered by index.

    ``topk`` alone picks arbitrarily among equal values (and differently on CPU and CUDA); a full
    stable sort is canonical but costs 10-20x more.  So: ``topk`` of a margin of extra elements,
    then a stable sort of that small set by (value, index).  Every element tied with the k-th is
    in the set unless more than ``k + 8`` values tie there, which an anchor grid does not produce
    (a square lattice has at most 8 points at one distance from any centre at these radii); even
    then the result is a correct top-k, only its tie-break is not canonical.
    """
    n = d.size(-1)
    k2 = min(n, 2 * k + 8)
    vals, idx = d.topk(k2, dim=-1, largest=False, sorted=False)
    order = idx.argsort(dim=-1)
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    order = vals.argsort(dim=-1, stable=True)[..., :k]
    return vals.gather(-1, order), idx.gather(-1, order)


def atss_assign(
    anchors: Tensor, num_level_anchors: Sequence[int], gt_boxes: Tensor, topk: int = 9
) -> Tensor:
    """ATSS assignment for one image.

    Args:
        anchors: (A, 4) xyxy anchor boxes concatenated over levels.
        num_level_anchors: anchors per level, summing to A.
        gt_boxes: (G, 4) xyxy ground-truth boxes (G may be 0).
        topk: candidates per level per ground truth.

    Returns:
        (A,) int64: index of the assigned ground truth, -1 for negatives.
    """
    if gt_boxes.dim() != 2 or gt_boxes.size(-1) != 4:
        raise ValueError(f"gt_boxes must have shape (G, 4), got {tuple(gt_boxes.shape)}")
    return atss_assign_batched(anchors, num_level_anchors, gt_boxes[None], topk=topk)[0]


@torch.no_grad()
def atss_assign_batched(
    anchors: Tensor,
    num_level_anchors: Sequence[int],
    gt_boxes: Tensor,
    gt_valid: Tensor | None = None,
    topk: int = 9,
    anchor_valid: Tensor | None = None,
) -> Tensor:
    """ATSS assignment for a batch of images sharing one anchor set.

    Args:
        anchors: (A, 4) xyxy anchors, concatenated over levels.
        num_level_anchors: anchors per level, summing to A.
        gt_boxes: (B, G, 4) ground truths, padded to the largest G of the batch.
        gt_valid: (B, G) bool marking real (not padding) ground truths; None = all real.
        topk: candidates per level per ground truth.
        anchor_valid: (B, A) bool; invalid anchors (e.g. on batch padding) take no part in the
            assignment, as mmdetection drops them before assigning.  None = all valid.

    Returns:
        (B, A) int64: index into G of the assigned ground truth, -1 for negatives.
    """
    if anchors.dim() != 2 or anchors.size(-1) != 4:
        raise ValueError(f"anchors must have shape (A, 4), got {tuple(anchors.shape)}")
    if gt_boxes.dim() != 3 or gt_boxes.size(-1) != 4:
        raise ValueError(f"gt_boxes must have shape (B, G, 4), got {tuple(gt_boxes.shape)}")
    num_anchors = anchors.size(0)
    if sum(num_level_anchors) != num_anchors:
        raise ValueError(
            f"num_level_anchors {list(num_level_anchors)} must sum to the number of "
            f"anchors {num_anchors}"
        )
    batch, num_gt = gt_boxes.shape[:2]
    device = anchors.device
    if num_gt == 0 or num_anchors == 0:
        return torch.full((batch, num_anchors), -1, dtype=torch.long, device=device)

    gt_boxes = gt_boxes.to(anchors.dtype)
    anchor_ctr = box_centers(anchors)  # (A, 2)
    gt_ctr = box_centers(gt_boxes)  # (B, G, 2)

    # 1. candidates: per level, the k nearest anchor centres (squared distance orders the same).
    # Layout (B, G, anchors) keeps the reductions over anchors contiguous.
    cand_idx, cand_ok = [], []
    start = 0
    for n in num_level_anchors:
        if n == 0:
            continue
        dx = anchor_ctr[None, None, start : start + n, 0] - gt_ctr[:, :, None, 0]
        dy = anchor_ctr[None, None, start : start + n, 1] - gt_ctr[:, :, None, 1]
        d2 = dx * dx + dy * dy  # (B, G, n)
        if anchor_valid is not None:
            d2 = d2.masked_fill(~anchor_valid[:, None, start : start + n], float("inf"))
        d2_k, idx_k = _smallest_k(d2, min(topk, n))
        cand_idx.append(idx_k + start)
        cand_ok.append(torch.isfinite(d2_k))  # false: invalid anchor
        start += n
    idx = torch.cat(cand_idx, dim=-1)  # (B, G, K)
    ok = torch.cat(cand_ok, dim=-1)  # (B, G, K)

    # 2. adaptive IoU threshold from the candidates' IoU statistics (per image and GT)
    gt = gt_boxes[:, :, None, :]  # (B, G, 1, 4)
    iou = aligned_iou(anchors[idx], gt)  # (B, G, K)
    okf = ok.to(iou.dtype)
    count = okf.sum(dim=-1, keepdim=True)  # (B, G, 1)
    mean = (iou * okf).sum(dim=-1, keepdim=True) / count
    var = ((iou - mean).pow(2) * okf).sum(dim=-1, keepdim=True) / (count - 1)  # NaN if count 1
    thr = mean + var.sqrt()

    # 3. centre strictly inside the ground truth
    ctr = anchor_ctr[idx]  # (B, G, K, 2)
    side = torch.stack(
        [
            ctr[..., 0] - gt[..., 0],
            ctr[..., 1] - gt[..., 1],
            gt[..., 2] - ctr[..., 0],
            gt[..., 3] - ctr[..., 1],
        ],
        dim=-1,
    )
    is_pos = ok & (iou >= thr) & (side.amin(dim=-1) > _INSIDE_EPS)
    if gt_valid is not None:
        is_pos &= gt_valid[:, :, None]

    # 4. conflicts: highest IoU wins, ties to the lower GT index.  Scatter over (image, anchor)
    # keys with order-independent reductions, so the result is deterministic on every device.
    key = (idx + torch.arange(batch, device=device)[:, None, None] * num_anchors).reshape(-1)
    val = iou.masked_fill(~is_pos, float("-inf")).reshape(-1)
    best = torch.full((batch * num_anchors,), float("-inf"), dtype=iou.dtype, device=device)
    best = best.scatter_reduce(0, key, val, reduce="amax")
    gt_index = torch.arange(num_gt, device=device)[None, :, None].expand_as(iou).reshape(-1)
    winner = is_pos.reshape(-1) & (val == best[key])
    sentinel = torch.full_like(gt_index, num_gt)
    chosen = torch.full((batch * num_anchors,), num_gt, dtype=torch.long, device=device)
    chosen = chosen.scatter_reduce(0, key, torch.where(winner, gt_index, sentinel), reduce="amin")
    return torch.where(chosen == num_gt, torch.full_like(chosen, -1), chosen).view(batch, -1)
