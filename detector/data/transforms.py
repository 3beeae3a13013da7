"""Image/box transforms of the detection pipeline (mmdetection semantics).

The pipeline is ``keep-ratio resize -> random horizontal flip -> ImageNet normalisation``;
padding to a multiple of 32 happens in the collate (:func:`detector.data.loader.collate`), as in
mmdetection. All randomness comes from an explicit :class:`numpy.random.Generator`, so a sample's
augmentation is a pure function of its seed (which is what makes mid-epoch resume exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


def rescale_size(width: int, height: int, scale: Sequence[int]) -> tuple[int, int, float]:
    """Keep-ratio target size for an image of ``width``×``height``.

    ``scale = (long, short)`` bounds the long and the short edge (mmdetection's ``(1333, 800)``):
    the factor is ``min(long / max(w, h), short / min(w, h))``. Returns ``(new_w, new_h, factor)``
    with the sizes rounded to the nearest integer.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    new_w = max(1, int(width * factor + 0.5))
    new_h = max(1, int(height * factor + 0.5))
    return new_w, new_h, factor


@dataclass
class TransformConfig:
    """Parameters of :class:`DetectionTransform`.

    ``img_scale`` is ``(long, short)`` (see :func:`rescale_size`); ``flip_prob`` the probability
    of a horizontal flip (0 for evaluation); ``mean``/``std`` are per-channel RGB in 0..255.
    """

    img_scale: tuple[int, int] = (1333, 800)
    flip_prob: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class DetectionTransform:
    """Resize (keep ratio), maybe flip, normalise.

    ``__call__(image, boxes, rng)`` takes a PIL RGB image, boxes float32 (G, 4) ``xyxy`` in the
    image's pixels, and a numpy Generator; it returns ``(tensor, boxes, meta)`` with ``tensor``
    float32 (3, H', W') normalised, ``boxes`` float32 (G, 4) in the resized (and flipped) image,
    and ``meta`` a dict with ``img_shape`` (H', W'), ``scale_factor`` (sx, sy, sx, sy) mapping
    original to resized coordinates, and ``flip`` (bool).
    """

    def __init__(self, cfg: TransformConfig) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(
        self, image: Image.Image, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, np.ndarray, dict]:
        w, h = image.size
        new_w, new_h, _ = rescale_size(w, h, self.cfg.img_scale)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        sx, sy = new_w / w, new_h / h
        boxes = boxes.astype(np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
        flip = bool(self.cfg.flip_prob > 0 and rng.random() < self.cfg.flip_prob)
        arr = np.array(image, dtype=np.uint8)  # a writable copy
        if flip:
            arr = arr[:, ::-1]
            boxes = boxes.copy()
            x1 = new_w - boxes[:, 2]
            x2 = new_w - boxes[:, 0]
            boxes[:, 0], boxes[:, 2] = x1, x2
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
        t = (t - self.mean) / self.std
        meta = {
            "img_shape": (new_h, new_w),
            "scale_factor": (sx, sy, sx, sy),
            "flip": flip,
        }
        return t, boxes, meta
