"""Turn the head's regression outputs into boxes, for training and inference alike.

* General distribution (GFL, DFL variants): each side is a softmax over bins 0..reg_max whose
  expectation (``gfl_ops.integral``) is the distance, in strides, from the anchor centre:
  ``box = centre -/+ integral * stride``.
* Dirac delta (ATSS, QFL variants): mmdetection's ``DeltaXYWHBBoxCoder`` relative to the anchor
  box, as in mmdetection's ATSS.
"""

from __future__ import annotations

import torch
from torch import Tensor

import gfl_ops
import gfl_ops.reference
from detector.ops.boxes import box_centers, delta2bbox, distance2bbox

__all__ = ["BoxCoder"]


class BoxCoder:
    """Decode regression outputs of either representation.

    Args:
        use_dfl: outputs are 4*(reg_max+1) distribution logits (else 4 deltas).
        reg_max: the last bin index.
        backend: gfl_ops backend for the integral (None = auto).
    """

    def __init__(self, use_dfl: bool, reg_max: int = 16, backend: str | None = None) -> None:
        self.use_dfl = use_dfl
        self.reg_max = reg_max
        self.backend = backend

    def distances(self, reg: Tensor) -> Tensor:
        """(K, 4*(reg_max+1)) logits -> (K, 4) expected distances in strides, via gfl_ops."""
        logits = reg.reshape(reg.size(0), 4, self.reg_max + 1)
        if torch.onnx.is_in_onnx_export():
            # the fused op has no ONNX symbolic; Softmax + MatMul exports everywhere
            return gfl_ops.reference.integral(logits)
        return gfl_ops.integral(logits, backend=self.backend)

    def decode(self, anchors: Tensor, strides: Tensor, reg: Tensor,
               max_shape: tuple[int, int] | Tensor | None = None) -> Tensor:
        """Boxes (K, 4) xyxy in pixels.

        Args:
            anchors: (K, 4) anchor boxes; strides: (K,) their levels' strides.
            reg: (K, R) regression outputs (R = 4*(reg_max+1) or 4).
            max_shape: optional ``(h, w)`` (or (K, 2) tensor) to clip to.
        """
        if self.use_dfl:
            dist = self.distances(reg) * strides[:, None].to(reg.dtype)
            return distance2bbox(box_centers(anchors), dist, max_shape)
        return delta2bbox(anchors, reg, max_shape=max_shape)
