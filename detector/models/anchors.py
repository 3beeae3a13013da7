"""Anchors of the ATSS / GFL head: one square box per feature-map location.

mmdetection's ``AnchorGenerator(ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
strides=[8, 16, 32, 64, 128])`` with ``center_offset=0``: the anchor of location (x, y) on the
level of stride s is centred at ``(x * s, y * s)`` and has side ``octave_base_scale * s``.  The
anchors only serve ATSS (IoU and centre distance) and, for GFL, as the points the distances are
measured from; the Dirac variants also decode their deltas relative to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["AnchorGenerator", "Anchors"]


class Anchors(NamedTuple):
    """All anchors of one padded input size, concatenated over levels (P3 first)."""

    boxes: Tensor  # (A, 4) xyxy, pixels
    strides: Tensor  # (A,) the stride of each anchor's level
    num_level_anchors: list[int]  # per-level counts, summing to A
    feat_sizes: list[tuple[int, int]]  # (H_l, W_l) per level

    @property
    def centers(self) -> Tensor:
        """(A, 2) anchor centres ``(x, y)``."""
        return (self.boxes[:, :2] + self.boxes[:, 2:]) * 0.5


# (torch.compiler.is_exporting exists from torch 2.7 on; before, is_compiling covers export)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _tracing() -> bool:
    """True inside torch.compile, torch.export or an ONNX export."""
    return torch.compiler.is_compiling() or _is_exporting() or torch.onnx.is_in_onnx_export()


class AnchorGenerator:
    """Builds :class:`Anchors` for given feature-map sizes (cached per size, device, dtype).

    Args:
        strides: stride of each level.
        octave_base_scale: anchor side in strides.
        center_offset: anchor centre offset in strides (0 as in mmdetection's GFL config).
    """

    def __init__(
        self,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        octave_base_scale: float = 8.0,
        center_offset: float = 0.0,
    ) -> None:
        self.strides = tuple(int(s) for s in strides)
        self.octave_base_scale = float(octave_base_scale)
        self.center_offset = float(center_offset)
        self._cache: dict[tuple, Anchors] = {}

    def __call__(
        self,
        feat_sizes: Sequence[tuple[int, int]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Anchors:
        feat_sizes = [(int(h), int(w)) for h, w in feat_sizes]
        if len(feat_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature sizes, got {len(feat_sizes)}")
        if _tracing():  # traced tensors (export, compile) must not outlive the trace
            return self._make(feat_sizes, torch.device(device), dtype)
        key = (tuple(feat_sizes), str(device), dtype)
        if key not in self._cache:
            if len(self._cache) > 32:  # multi-scale training sees many sizes; bound the cache
                self._cache.clear()
            self._cache[key] = self._make(feat_sizes, torch.device(device), dtype)
        return self._cache[key]

    def _make(
        self, feat_sizes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> Anchors:
        boxes, strides = [], []
        for (h, w), s in zip(feat_sizes, self.strides):
            ys = (torch.arange(h, device=device, dtype=dtype) + self.center_offset) * s
            xs = (torch.arange(w, device=device, dtype=dtype) + self.center_offset) * s
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # row-major: index = y * W + x
            ctr = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=-1)
            half = 0.5 * self.octave_base_scale * s
            boxes.append(torch.cat([ctr - half, ctr + half], dim=-1))
            strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
        return Anchors(
            torch.cat(boxes), torch.cat(strides), [h * w for h, w in feat_sizes], feat_sizes
        )

    def valid_flags(self, anchors: Anchors, image_sizes: Tensor) -> Tensor:
        """Which anchors lie on each image's own content rather than on batch padding.

        As mmdetection: on a level of stride s, location (x, y) is valid when
        ``x < ceil(w / s)`` and ``y < ceil(h / s)``.  Invalid anchors are neither positive nor
        negative.

        Args:
            image_sizes: (B, 2) ``(h, w)`` of each image inside the padded batch.

        Returns:
            (B, A) bool.
        """
        flags = []
        sizes = image_sizes.to(torch.float32)
        for (h, w), s in zip(anchors.feat_sizes, self.strides):
            vh = torch.ceil(sizes[:, 0] / s).clamp(max=h)
            vw = torch.ceil(sizes[:, 1] / s).clamp(max=w)
            ys = torch.arange(h, device=image_sizes.device, dtype=torch.float32)
            xs = torch.arange(w, device=image_sizes.device, dtype=torch.float32)
            ok = (ys[None, :, None] < vh[:, None, None]) & (xs[None, None, :] < vw[:, None, None])
            flags.append(ok.reshape(ok.size(0), -1))
        return torch.cat(flags, dim=1)
