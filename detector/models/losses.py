"""Training loss of the GFL detector and its ablation variants (GFL paper Eq. 8).

``L = 1/N_pos * sum_z L_Q  +  1/N_pos * sum_{z in pos} 1{c*_z > 0} (2 * L_B + 0.25 * L_D)``,
with mmdetection's weighting:

* ``loss_cls``: QFL (beta = 2) over every valid anchor; the target of a positive is the IoU of
  its *detached* decoded box with its ground truth on the GT class, 0 elsewhere; divided by the
  number of positives, an image without any counting as 1 (mmdetection's ``max(n_i, 1)``).
  Focal-loss variants: sigmoid focal loss (alpha 0.25, gamma 2) on one-hot labels.
* ``loss_bbox``: GIoU loss x 2 on decoded boxes, and ``loss_dfl``: DFL x 0.25 (over the 4 sides,
  averaged with ``avg_factor = 4``), each weighted per positive by a detached weight -- its
  highest class probability for the QFL variants, its centre-ness target for the focal-loss
  variants (as mmdetection's ATSS) -- and divided by the sum of those weights.  DFL targets are
  distances from the anchor centre in strides, clamped to ``[0, reg_max - 0.1]``.
* ``loss_centerness`` (focal-loss variants): BCE on the centre-ness logit, / number of positives.

Ablation options (``ModelConfig.box_repr`` / ``dfl_loss`` / ``cls_loss``, the GFL paper's
Table 2(a) and its rebuttal's Table I):

* ``cls_loss='l2'``: the squared error ``(sigmoid(x) - y)^2`` replaces QFL on the same joint
  targets, summed over anchors and classes and divided by the number of positives as QFL is.
* ``box_repr='gaussian'``: GIoU on the boxes decoded from the means, plus ``loss_nll``, the
  Gaussian negative log-likelihood of the per-side target distances (in strides, unclamped)
  ``(y - mu)^2 / (2 sigma^2) + log sigma`` (Table 5), weighted and normalised as DFL
  (``loss_nll_weight`` 0.25, averaged over the 4 sides).
* ``box_repr='general'`` with ``dfl_loss=False``: GIoU alone trains the distribution.

Both normalisers are averaged over ranks with one ``all_reduce`` that every rank issues every
step, positives or not (a rank that skips a collective hangs the others, nanodet#422), then
floored at 1 (no division by zero without positives, mmdetection PR #4978).  They stay tensors:
no ``.item()`` host sync.  QFL, DFL and the integral go through ``gfl_ops``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

import gfl_ops
from detector.config import ModelConfig
from detector.models.anchors import Anchors
from detector.models.assigners import atss_assign_batched
from detector.models.coder import BoxCoder
from detector.ops.boxes import aligned_iou, bbox2distance, box_centers, centerness_target, giou_loss

__all__ = [
    "DetectionLoss",
    "reduce_mean",
    "pad_targets",
    "giou_loss",
    "gaussian_nll",
    "l2_joint_score_loss",
    "LOG_SIGMA_RANGE",
]

# log-sigma (in strides) is clamped here in the NLL: as sigma -> 0 the NLL's weight on the
# mean, 1 / sigma^2, would grow without bound once a side is fitted (sigma >= 0.05 strides)
LOG_SIGMA_RANGE = (-3.0, 3.0)


def gaussian_nll(mean: Tensor, log_sigma: Tensor, target: Tensor) -> Tensor:
    """Element-wise negative log-likelihood of ``target`` under ``N(mean, sigma^2)``, without the
    constant ``log(2 pi) / 2``: ``(target - mean)^2 / (2 sigma^2) + log sigma`` with ``log_sigma``
    clamped to :data:`LOG_SIGMA_RANGE`. Any matching shapes, float; returns the same shape."""
    s = log_sigma.clamp(*LOG_SIGMA_RANGE)
    return 0.5 * (target - mean).pow(2) * torch.exp(-2.0 * s) + s


def l2_joint_score_loss(
    logits: Tensor, labels: Tensor, scores: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Sum over anchors and classes of ``(sigmoid(logit) - y)^2``, ``y`` the joint target (the IoU
    ``scores[i]`` at class ``labels[i]``, 0 elsewhere; a label outside ``[0, C)`` is background).

    Args:
        logits: (N, C) float; labels: (N,) int64; scores: (N,) float in [0, 1];
        weight: optional (N,) per-anchor weight (0 for ignored anchors).

    Returns:
        0-d tensor (the sum; the caller normalises, e.g. by the number of positives).
    """
    num_classes = logits.size(1)
    target = torch.zeros_like(logits)
    fg = (labels >= 0) & (labels < num_classes)
    target[fg, labels[fg]] = scores[fg].to(logits.dtype)
    per_anchor = (logits.sigmoid() - target).pow(2).sum(dim=1)
    if weight is not None:
        per_anchor = per_anchor * weight
    return per_anchor.sum()


def reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over all ranks when ``torch.distributed`` is initialised (else identity).

    Every rank must call this the same number of times per step.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t
    world = dist.get_world_size()
    if world == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world


def pad_targets(
    targets: Sequence[Mapping[str, Tensor]], num_classes: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image targets, padded to the largest number of boxes.

    Args:
        targets: per image ``{'boxes': (G_i, 4) xyxy float, 'labels': (G_i,) int64}``.

    Returns:
        boxes (B, G, 4) float32, labels (B, G) int64, valid (B, G) bool.
    """
    num_gt = []
    for i, t in enumerate(targets):
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.size(-1) != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"targets[{i}]: boxes must be (G, 4) and labels (G,), got "
                f"{tuple(boxes.shape)} and {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point:
            raise TypeError(f"targets[{i}]['labels'] must be integer class ids, got {labels.dtype}")
        # value check only where it costs no device sync
        if (
            labels.device.type == "cpu"
            and labels.numel()
            and (bool((labels < 0).any()) or bool((labels >= num_classes).any()))
        ):
            raise ValueError(
                f"targets[{i}]['labels'] must lie in [0, {num_classes}), got "
                f"min {int(labels.min())}, max {int(labels.max())}"
            )
        num_gt.append(boxes.size(0))
    batch, g = len(targets), max(num_gt, default=0)
    boxes = torch.zeros(batch, g, 4, device=device)
    labels = torch.zeros(batch, g, dtype=torch.long, device=device)
    valid = torch.zeros(batch, g, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = num_gt[i]
        boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
        labels[i, :n] = t["labels"].to(device)
        valid[i, :n] = True
    return boxes, labels, valid


class DetectionLoss(nn.Module):
    """Assigns anchors with ATSS and computes the losses of the configured variant.

    ``forward(cls (B, A, C), reg (B, A, R), centerness (B, A) | None, anchors, targets,
    anchor_valid (B, A) bool | None) -> {'loss_cls', 'loss_bbox', ['loss_dfl'],
    ['loss_centerness'], 'loss'}`` (0-d float32 tensors; 'loss' is their sum).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.coder = BoxCoder(
            cfg.box_representation == "general",
            cfg.reg_max,
            cfg.gfl_backend,
            box_repr=cfg.box_representation,
        )

    def forward(
        self,
        cls: Tensor,
        reg: Tensor,
        centerness: Tensor | None,
        anchors: Anchors,
        targets: Sequence[Mapping[str, Tensor]],
        anchor_valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        batch, num_anchors, num_classes = cls.shape
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        device = cls.device
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, num_classes, device)
        assigned = atss_assign_batched(
            anchors.boxes,
            anchors.num_level_anchors,
            gt_boxes,
            gt_valid,
            cfg.atss_topk,
            anchor_valid,
        )  # (B, A)
        pos_b, pos_a = (assigned >= 0).nonzero(as_tuple=True)  # the one host sync per step
        pos_g = assigned[pos_b, pos_a]
        pos_gt = gt_boxes[pos_b, pos_g]  # (P, 4)
        pos_labels = gt_labels[pos_b, pos_g]  # (P,)
        pos_anchors = anchors.boxes[pos_a]
        pos_strides = anchors.strides[pos_a]

        # losses in fp32 whatever the autocast dtype of the head (NaN under AMP, GFocalV2#4)
        cls_flat = cls.float().reshape(batch * num_anchors, num_classes)
        pos_flat = pos_b * num_anchors + pos_a
        pos_reg = reg[pos_b, pos_a].float()  # (P, R)
        pos_box = self.coder.decode(pos_anchors, pos_strides, pos_reg)
        if cfg.joint_score:
            weight = cls_flat[pos_flat].detach().sigmoid().amax(dim=1)
        else:
            ctr_target = centerness_target(box_centers(pos_anchors), pos_gt)
            weight = ctr_target

        # mmdetection counts an image without positives as 1 (sum of max(num_pos_i, 1))
        num_pos = (assigned >= 0).sum(dim=1).clamp(min=1).sum().float()
        stats = reduce_mean(torch.stack([num_pos, weight.sum().float()]))
        num_pos_avg = stats[0].clamp(min=1.0)
        weight_avg = stats[1].clamp(min=1.0)
        valid_w = anchor_valid.reshape(-1).to(cls_flat.dtype) if anchor_valid is not None else None

        losses: dict[str, Tensor] = {}
        if cfg.joint_score:
            labels = torch.full(
                (batch * num_anchors,), num_classes, dtype=torch.long, device=device
            )
            labels[pos_flat] = pos_labels
            scores = torch.zeros(batch * num_anchors, dtype=cls_flat.dtype, device=device)
            scores[pos_flat] = aligned_iou(pos_box.detach(), pos_gt)
            if cfg.classification_loss == "l2":
                loss_cls = l2_joint_score_loss(cls_flat, labels, scores, valid_w) / num_pos_avg
            else:
                # the scores are IoUs, in [0, 1] by construction: no value check, so no host
                # sync per step on a GPU
                loss_cls = gfl_ops.quality_focal_loss(
                    cls_flat,
                    (labels, scores),
                    valid_w,
                    reduction="mean",
                    avg_factor=num_pos_avg,
                    beta=cfg.qfl_beta,
                    backend=cfg.gfl_backend,
                    check_values=False,
                )
        else:
            onehot = torch.zeros_like(cls_flat)
            onehot[pos_flat, pos_labels] = 1.0
            per_anchor = sigmoid_focal_loss(
                cls_flat, onehot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="none"
            ).sum(dim=1)
            if valid_w is not None:
                per_anchor = per_anchor * valid_w
            loss_cls = per_anchor.sum() / num_pos_avg
        losses["loss_cls"] = cfg.loss_cls_weight * loss_cls

        loss_bbox = (giou_loss(pos_box, pos_gt) * weight).sum() / weight_avg
        losses["loss_bbox"] = cfg.loss_bbox_weight * loss_bbox

        if cfg.use_dfl:
            bins = cfg.reg_max + 1
            stride = pos_strides[:, None]
            dfl_target = bbox2distance(
                box_centers(pos_anchors) / stride, pos_gt / stride, max_dis=cfg.reg_max
            )  # (P, 4)
            loss_dfl = gfl_ops.distribution_focal_loss(
                pos_reg.reshape(-1, bins),
                dfl_target.reshape(-1),
                weight[:, None].expand(-1, 4).reshape(-1),
                reduction="mean",
                avg_factor=4.0,
                backend=cfg.gfl_backend,
                check_values=False,
            )  # clamped by bbox2distance
            losses["loss_dfl"] = cfg.loss_dfl_weight * loss_dfl / weight_avg

        if cfg.box_representation == "gaussian":
            stride = pos_strides[:, None]
            mean, log_sigma = self.coder.gaussian_params(pos_reg)
            nll_target = bbox2distance(box_centers(pos_anchors) / stride, pos_gt / stride)
            nll = gaussian_nll(mean, log_sigma, nll_target).mean(dim=1)  # (P,)
            losses["loss_nll"] = cfg.loss_nll_weight * (nll * weight).sum() / weight_avg

        if centerness is not None:
            pos_ctr = centerness[pos_b, pos_a].float()
            loss_ctr = F.binary_cross_entropy_with_logits(pos_ctr, ctr_target, reduction="sum")
            losses["loss_centerness"] = cfg.loss_centerness_weight * loss_ctr / num_pos_avg

        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses
