"""Adapters that plug gfl_ops into the detection frameworks people train with.

Each submodule imports its framework and is imported explicitly; ``import gfl_ops`` never
imports them, so the core package needs neither framework:

* :mod:`gfl_ops.integrations.mmdet`: ``FusedQualityFocalLoss``, ``FusedDistributionFocalLoss``
  and ``FusedIntegral`` registered in mmdet's ``MODELS``, and ``fuse(model)``.
* :mod:`gfl_ops.integrations.ultralytics`: ``patch(model)`` for a ``YOLO`` or its
  ``DetectionModel`` (YOLOv8 / YOLO11 style: the Detect head's DFL, ``v8DetectionLoss``, and
  ``YOLO.train()``'s trainer), and ``patch_trainer()`` for trainers a user builds.
"""
