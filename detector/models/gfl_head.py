"""Shared dense head of the GFL / ATSS variants.

Per pyramid level: a classification tower and a regression tower of ``stacked_convs`` 3x3 convs
(no bias) + GroupNorm + ReLU, then 3x3 output convs:

* ``cls``: ``num_classes`` logits (QFL joint score, or focal-loss class score);
* ``reg``: ``4 * (reg_max + 1)`` distribution logits per side (General distribution), 4 deltas
  (Dirac, ATSS baseline) or 4 means + 4 log-sigmas (Gaussian, the paper's Table 2(a) baseline),
  multiplied by a learnable per-level scalar ``Scale``;
* ``centerness`` (focal-loss variants only): 1 logit, from the regression tower (as in ATSS).

Weights are ``normal(0, 0.01)``; the classifier bias is ``-log((1 - p) / p)`` with prior
``p = 0.01`` so the initial foreground probability is 0.01 everywhere and the loss of the many
negatives does not swamp the first iterations (RetinaNet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

__all__ = ["GFLHead", "HeadOutputs", "Scale", "flatten_levels", "reg_channels"]


def reg_channels(box_repr: str, reg_max: int) -> int:
    """Regression outputs per location for a box representation ('dirac' | 'gaussian' |
    'general')."""
    return {"dirac": 4, "gaussian": 8, "general": 4 * (reg_max + 1)}[box_repr]


class HeadOutputs(NamedTuple):
    """Raw head outputs, one (B, K, H_l, W_l) tensor per level."""

    cls: list[Tensor]  # K = num_classes
    reg: list[Tensor]  # K = reg_channels(box_repr, reg_max)
    centerness: Optional[list[Tensor]]  # K = 1; None for the QFL variants


class Scale(nn.Module):
    """Multiply by a learnable scalar (initialised to ``init``)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(in_channels: int, feat_channels: int, num_convs: int, gn_groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [
            nn.Conv2d(
                in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1, bias=False
            ),  # GroupNorm follows, a bias would be redundant
            nn.GroupNorm(gn_groups, feat_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class GFLHead(nn.Module):
    """Dense head applied with shared weights to every level (except the per-level ``Scale``).

    Args:
        num_classes: foreground classes C.
        in_channels / feat_channels: FPN and tower widths (256 / 256).
        stacked_convs: convs per tower (4).
        num_levels: pyramid levels (5), one ``Scale`` each.
        reg_max: the General distribution has bins 0..reg_max.
        use_dfl: General distribution (4*(reg_max+1) logits) if True, else 4 Dirac deltas.
        with_centerness: add the ATSS centre-ness output.
        gn_groups, prior_prob: GroupNorm groups (32) and classifier prior (0.01).
        box_repr: 'dirac' | 'gaussian' | 'general' (overrides ``use_dfl``); None: 'general'
            if ``use_dfl`` else 'dirac'.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 5,
        reg_max: int = 16,
        use_dfl: bool = True,
        with_centerness: bool = False,
        gn_groups: int = 32,
        prior_prob: float = 0.01,
        box_repr: str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.box_repr = box_repr or ("general" if use_dfl else "dirac")
        self.use_dfl = self.box_repr == "general"
        self.reg_channels = reg_channels(self.box_repr, reg_max)
        self.cls_convs = _tower(in_channels, feat_channels, stacked_convs, gn_groups)
        self.reg_convs = _tower(in_channels, feat_channels, stacked_convs, gn_groups)
        self.cls_out = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(feat_channels, self.reg_channels, 3, padding=1)
        self.centerness_out = nn.Conv2d(feat_channels, 1, 3, padding=1) if with_centerness else None
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Sequence[Tensor]) -> HeadOutputs:
        """feats: P3..P7, each (B, in_channels, H_l, W_l)."""
        if len(feats) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} pyramid levels, got {len(feats)}")
        cls, reg, ctr = [], [], []
        for x, scale in zip(feats, self.scales):
            cls_feat = self.cls_convs(x)
            reg_feat = self.reg_convs(x)
            cls.append(self.cls_out(cls_feat))
            reg.append(scale(self.reg_out(reg_feat)))
            if self.centerness_out is not None:
                ctr.append(self.centerness_out(reg_feat))
        return HeadOutputs(cls, reg, ctr if self.centerness_out is not None else None)


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """[(B, K, H_l, W_l)] -> (B, sum_l H_l*W_l, K), locations in row-major (y, x) order per level
    (the anchor order of :class:`detector.models.anchors.AnchorGenerator`)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.size(0), -1, m.size(1)) for m in maps], dim=1)
