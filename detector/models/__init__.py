"""The detector network and everything that belongs to it: backbone, FPN, GFL head, anchors, box
coder, ATSS assignment, training loss and post-processing, assembled in :class:`GFLDetector`.

Modules, lowest first: ``anchors``, ``coder`` (box representations), ``backbone``, ``fpn``,
``gfl_head`` (the dense head's layers), ``assigners`` (ATSS), ``losses`` (the training loss),
``postprocess`` (head outputs to detections), ``detector`` (the assembled model and
:func:`build_detector`). The model's options, :class:`ModelConfig`, live in
:mod:`detector.config` with the other configurations. Nothing here imports from the layers above
(engine, evaluation, commands).
"""

from __future__ import annotations

from detector.config import VARIANTS, ModelConfig
from detector.models.detector import GFLDetector, build_detector

__all__ = ["ModelConfig", "VARIANTS", "GFLDetector", "build_detector"]
