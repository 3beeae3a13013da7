"""Turn the head's regression outputs into boxes, for training and inference alike.

* General distribution (GFL, DFL variants): each side is a softmax over bins 0..reg_max whose
  expectation (``gfl_ops.integral``) is the distance, in strides, from the anchor centre:
  ``box = centre -/+ integral * stride``.
* Dirac delta (ATSS, QFL variants): mmdetection's ``DeltaXYWHBBoxCoder`` relative to the anchor
  box, as in mmdetection's ATSS.
* Gaussian (``box_repr='gaussian'``, Table 2(a)'s baseline): per side a mean distance in strides,
  ``softplus`` of the first 4 outputs (positive, smooth, no dead units), and a log-sigma (the
  last 4) that only the training loss uses; the box is decoded from the means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        box_repr: 'dirac' | 'gaussian' | 'general' (overrides ``use_dfl``); None: 'general' if
            ``use_dfl`` else 'dirac'. ``use_dfl`` is True exactly for 'general'.
    """

    def __init__(
        self,
        use_dfl: bool,
        reg_max: int = 16,
        backend: str | None = None,
        box_repr: str | None = None,
    ) -> None:
        self.box_repr = box_repr or ("general" if use_dfl else "dirac")
        self.use_dfl = self.box_repr == "general"
        self.reg_max = reg_max
        self.backend = backend

    @staticmethod
    def gaussian_params(reg: Tensor) -> tuple[Tensor, Tensor]:
        """(K, 8) Gaussian outputs -> per side mean distance (K, 4) in strides (> 0) and
        log-sigma (K, 4), the raw outputs (the loss clamps them)."""
        return F.softplus(reg[:, :4]), reg[:, 4:]

    def distances(self, reg: Tensor) -> Tensor:
        """(K, 4*(reg_max+1)) logits -> (K, 4) expected distances in strides, via gfl_ops."""
        logits = reg.reshape(reg.size(0), 4, self.reg_max + 1)
        if torch.onnx.is_in_onnx_export():
            # the fused op has no ONNX symbolic; Softmax + MatMul exports everywhere
            return gfl_ops.reference.integral(logits)
        return gfl_ops.integral(logits, backend=self.backend)

    def decode(
        self,
        anchors: Tensor,
        strides: Tensor,
        reg: Tensor,
        max_shape: tuple[int, int] | Tensor | None = None,
    ) -> Tensor:
        """Boxes (K, 4) xyxy in pixels.

        Args:
            anchors: (K, 4) anchor boxes; strides: (K,) their levels' strides.
            reg: (K, R) regression outputs (R = 4*(reg_max+1), 4 or 8 for Gaussian).
            max_shape: optional ``(h, w)`` (or (K, 2) tensor) to clip to.
        """
        if self.use_dfl:
            dist = self.distances(reg) * strides[:, None].to(reg.dtype)
            return distance2bbox(box_centers(anchors), dist, max_shape)
        if self.box_repr == "gaussian":
            dist = self.gaussian_params(reg)[0] * strides[:, None].to(reg.dtype)
            return distance2bbox(box_centers(anchors), dist, max_shape)
        return delta2bbox(anchors, reg, max_shape=max_shape)
