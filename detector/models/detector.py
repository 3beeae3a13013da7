"""ATSS + GFL one-stage detector: ResNet-FPN backbone, GFL head, ATSS assignment, gfl_ops losses.

Public API (what the training / evaluation scripts use)
======================================================

``build_detector(cfg: ModelConfig | dict | None = None, **overrides) -> GFLDetector``
    ``cfg`` keys are the fields of :class:`detector.config.ModelConfig`: ``depth``
    (18/34/50/101), ``num_classes``, ``variant`` ('gfl' | 'atss' | 'qfl' | 'dfl', the rows of the
    paper's Table 3), the ablation options ``box_repr`` / ``dfl_loss`` / ``cls_loss`` (see
    :mod:`detector.config`), ``reg_max`` (16), ``pretrained`` (None, a local checkpoint
    path, or a torchvision weights enum / name such as 'IMAGENET1K_V1'), loss weights, test
    settings (``score_thr``, ``nms_pre``, ``nms_iou``, ``max_per_img``) and ``gfl_backend``
    (None = auto, 'cpu', 'cuda', 'triton', 'reference').  Unknown keys raise.

``GFLDetector.forward(images, targets=None)``
    images: (B, 3, H, W) float, normalised and padded (any H, W; multiples of 32 as usual).
    targets: per image ``{'boxes': (G, 4) float xyxy in input pixels, 'labels': (G,) int64 in
    0..num_classes-1}``, optionally ``'image_size': (h, w)`` -- the image's extent inside the
    padded batch; anchors outside it are ignored by the loss (mmdetection's valid flags).
    G may be 0.
    With targets: returns the loss dict -- ``loss_cls``, ``loss_bbox``, ``loss_dfl`` (DFL
    variants), ``loss_nll`` (Gaussian boxes), ``loss_centerness`` (focal-loss variants) and
    their sum ``loss`` (0-d tensors; backpropagate ``loss``).  Works in train and eval mode
    (validation loss).
    Without targets: returns the raw :class:`HeadOutputs` (per-level maps).

``GFLDetector.predict(images, image_sizes=None, scale_factors=None, original_sizes=None,
with_distributions=False) -> list[dict]``
    Inference under ``torch.no_grad()`` (call ``model.eval()`` first).  ``image_sizes``: per
    image (h, w) of the resized image inside the padded input (default: the padded size);
    ``scale_factors``: per image a number or (sx, sy) = resized / original; or
    ``original_sizes``: per image (h, w) of the original image, from which the scale factors
    follow.  Returns per image ``boxes`` (K, 4) float32 xyxy in original-image coordinates,
    ``scores`` (K,), ``labels`` (K,) int64, and with ``with_distributions=True``
    ``distributions`` (K, 4, reg_max + 1), the per-side (left, top, right, bottom) box
    distributions of the General variants.  K <= max_per_img, sorted by score.

Losses are normalised by quantities averaged over ranks when ``torch.distributed`` is initialised
(every rank runs the same collective every step).  Parameter groups: the backbone's frozen
stem and stage 1 have ``requires_grad=False``; pass ``filter(lambda p: p.requires_grad, ...)``
or all parameters to the optimiser, both work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detector.config import ModelConfig
from detector.models.anchors import AnchorGenerator, Anchors
from detector.models.backbone import ResNetBackbone
from detector.models.coder import BoxCoder
from detector.models.fpn import FPN
from detector.models.gfl_head import GFLHead, HeadOutputs, flatten_levels
from detector.models.losses import DetectionLoss
from detector.models.postprocess import PostProcessConfig, postprocess

__all__ = ["GFLDetector", "build_detector"]


class GFLDetector(nn.Module):
    """The detector; build it with :func:`build_detector`.  See the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.depth, cfg.frozen_stages, cfg.norm_eval, cfg.pretrained)
        self.neck = FPN(self.backbone.out_channels, cfg.fpn_channels, num_extra=2)
        self.head = GFLHead(
            cfg.num_classes,
            cfg.fpn_channels,
            cfg.feat_channels,
            cfg.stacked_convs,
            len(cfg.strides),
            cfg.reg_max,
            with_centerness=cfg.with_centerness,
            gn_groups=cfg.gn_groups,
            prior_prob=cfg.prior_prob,
            box_repr=cfg.box_representation,
        )
        self.anchor_generator = AnchorGenerator(cfg.strides, cfg.octave_base_scale)
        self.criterion = DetectionLoss(cfg)
        self.coder = BoxCoder(
            cfg.box_representation == "general",
            cfg.reg_max,
            cfg.gfl_backend,
            box_repr=cfg.box_representation,
        )
        self.test_cfg = PostProcessConfig(
            cfg.score_thr, cfg.nms_pre, cfg.nms_iou, cfg.max_per_img, cfg.min_bbox_size
        )

    @property
    def loss_names(self) -> list[str]:
        """Keys of the loss dict returned in training, 'loss' (the total) last."""
        names = ["loss_cls", "loss_bbox"]
        if self.cfg.use_dfl:
            names.append("loss_dfl")
        if self.cfg.box_representation == "gaussian":
            names.append("loss_nll")
        if self.cfg.with_centerness:
            names.append("loss_centerness")
        return names + ["loss"]

    def forward_head(self, images: Tensor) -> HeadOutputs:
        """Backbone, FPN and head: per-level maps for P3..P7."""
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        return self.head(self.neck(self.backbone(images)))

    def _flatten(self, outs: HeadOutputs) -> tuple[Tensor, Tensor, Tensor | None, Anchors]:
        sizes = [tuple(m.shape[-2:]) for m in outs.cls]
        anchors = self.anchor_generator(sizes, outs.cls[0].device)
        ctr = flatten_levels(outs.centerness)[..., 0] if outs.centerness is not None else None
        return flatten_levels(outs.cls), flatten_levels(outs.reg), ctr, anchors

    def forward(self, images: Tensor, targets: Sequence[Mapping[str, Any]] | None = None):
        """Losses (with ``targets``) or raw head outputs (without); see the module docstring."""
        outs = self.forward_head(images)
        if targets is None:
            return outs
        cls, reg, ctr, anchors = self._flatten(outs)
        anchor_valid = None
        if any("image_size" in t for t in targets):
            hw = [tuple(t.get("image_size", images.shape[-2:])) for t in targets]
            sizes = torch.tensor([[int(h), int(w)] for h, w in hw], device=images.device)
            anchor_valid = self.anchor_generator.valid_flags(anchors, sizes)
        return self.criterion(cls, reg, ctr, anchors, targets, anchor_valid)

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        scale_factors: Sequence | Tensor | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        with_distributions: bool = False,
    ) -> list[dict[str, Tensor]]:
        """Detections per image; see the module docstring."""
        outs = self.forward_head(images)
        cls, reg, ctr, anchors = self._flatten(outs)
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.size(0)
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        return postprocess(
            cls,
            reg,
            ctr,
            anchors,
            self.coder,
            self.test_cfg,
            image_sizes,
            scale_factors,
            original_sizes,
            with_distributions,
        )


def build_detector(
    cfg: ModelConfig | Mapping[str, Any] | None = None, **overrides: Any
) -> GFLDetector:
    """Build a :class:`GFLDetector` from a :class:`ModelConfig`, a dict of its fields, or the
    defaults (GFL R50, 80 classes), with keyword overrides.

    Examples:
        ``build_detector({'depth': 18, 'num_classes': 3, 'variant': 'atss'})``
        ``build_detector(depth=50, pretrained='/models/resnet50-0676ba61.pth')``
    """
    if cfg is None:
        cfg = ModelConfig(**overrides)
    elif isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg
    elif isinstance(cfg, Mapping):
        cfg = ModelConfig.from_dict({**cfg, **overrides})
    else:
        raise TypeError(f"cfg must be a ModelConfig, a dict or None, got {type(cfg).__name__}")
    return GFLDetector(cfg)
