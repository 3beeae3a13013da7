"""Detector model: backbone, FPN, GFL head and the assembled :class:`GFLDetector`.

``build_detector`` / ``GFLDetector`` are imported lazily so that ``detector.losses`` and
``detector.postprocess`` can use the small modules of this package without an import cycle.
"""

from __future__ import annotations

from typing import Any

from detector.config import VARIANTS, ModelConfig

__all__ = ["ModelConfig", "VARIANTS", "GFLDetector", "build_detector"]


def __getattr__(name: str) -> Any:
    if name in ("GFLDetector", "build_detector"):
        from detector.models import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'detector.models' has no attribute {name!r}")
