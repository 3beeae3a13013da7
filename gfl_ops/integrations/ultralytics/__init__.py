"""Ultralytics adapter: run YOLOv8 / YOLO11-style models on gfl_ops' fused DFL and integral.

::

    from ultralytics import YOLO
    from gfl_ops.integrations.ultralytics import patch

    model = patch(YOLO("yolo11n.pt"))      # or patch(detection_model)
    model.train(data="coco8.yaml")         # trains with the fused ops
    model.predict("bus.jpg"); model.val(); model.export(format="onnx")

What :func:`patch` changes, on the object it is given only (nothing global: an unpatched model in
the same process keeps running Ultralytics' own code):

* Every ``ultralytics.nn.modules.block.DFL`` in the model (the Detect head's box decoding; one
  module serves the one-to-many and one-to-one branches) becomes a :class:`FusedDFL`, which
  holds the same ``conv`` (state-dict key ``model.<i>.dfl.conv.weight``, same value, frozen as
  before) and decodes with :func:`gfl_ops.integral`.
* The model's loss (``v8DetectionLoss``, built lazily by ``DetectionModel.init_criterion``, also
  inside ``E2ELoss``) uses :class:`FusedDFLoss` for the DFL term and :func:`gfl_ops.integral` in
  ``bbox_decode``.  The model's class becomes ``Fused<class>`` (e.g. :class:`FusedDetectionModel`)
  whose ``init_criterion`` does that.
* Given a ``YOLO`` object, ``train()`` runs a trainer made by :func:`patch_trainer`: Ultralytics'
  trainer builds a *new* DetectionModel (``get_model``), so patching the model object alone would
  be lost.  The fused trainer patches the model it builds or is given (hence also its EMA copy
  and resumed / DDP runs: a multi-GPU worker rebuilds the trainer from its class, which is
  published for it when made at run time, see ``_classes``) and the best checkpoint it validates
  at the end; ``train()`` re-patches ``yolo.model`` after reloading the trained checkpoint.  The
  ``yolo`` command's equivalent is ``gfl-yolo`` (``python -m gfl_ops.integrations.ultralytics``,
  same arguments, :mod:`~gfl_ops.integrations.ultralytics.__main__`).  ``tune()`` starts a
  ``yolo train`` process per trial; a patched ``YOLO`` starts ``gfl-yolo train`` instead
  (``_tuning``).

Counting convention: Ultralytics' ``reg_max`` is the number of bins (16); gfl_ops' ``n`` is
``bins - 1`` (15).  Nothing to configure: the bins are read off the tensors.

Semantics kept from Ultralytics: the DFL target is clamped to ``[0, reg_max - 1 - 0.01]`` and the
loss is the mean over a box's four sides, shape (M, 1); the head's DFL output is (B, 4, A) in the
input's dtype.  Numerically the fused ops agree with the stock formulas to float rounding.

Checkpoints: the fused trainer and ``YOLO.save()`` write *stock* checkpoints (the model is
unpatched around the write), so ``best.pt`` / ``last.pt`` load anywhere without gfl_ops, also with
``ULTRALYTICS_SAFE_LOAD=1``; a checkpoint naming gfl_ops classes would otherwise make
Ultralytics' loader try to ``pip install`` the missing module.  ``torch.save`` of a patched model
pickles the fused classes (loading it needs gfl_ops); :func:`unpatch` turns a model back first.
``copy.deepcopy`` (EMA, validators, exporters) keeps the patch.

Export (ONNX with either exporter, TorchScript, ``torch.export`` and the formats built on them)
runs the stock DFL computation -- softmax and the 1x1 convolution, standard ONNX ops -- since the
fused operator has no ONNX symbolic and would tie the exported artifact to gfl_ops.

The adapter's parts, each a private module of this package: ``_classes`` (patching by switching
an object's class: the registry of fused subclasses), ``_modules`` (:class:`FusedDFL`,
:class:`FusedDFLoss` and the loss's decoding), ``_model`` (a ``DetectionModel`` patched and
unpatched), ``_training`` (:func:`patch_trainer`, :class:`FusedYOLO`), ``_tuning`` (the tuner's
trial processes started under ``gfl-yolo``).  Every class they define is re-exported here, and
names this module as its own (what pickles record).
"""

from __future__ import annotations

# The imports marked F401 are not used here: they keep every name this module had as one file
# (imported ones included) resolving on it.
import contextlib  # noqa: F401
import warnings  # noqa: F401
from collections.abc import Iterator  # noqa: F401
from pathlib import Path  # noqa: F401
from typing import (
    Any,
    TypeVar,  # noqa: F401
)

import torch  # noqa: F401
import ultralytics
from torch import nn  # noqa: F401

from gfl_ops import functional  # noqa: F401

from .._versions import unsupported, warn_if_older_than_tested

warn_if_older_than_tested("ultralytics", ultralytics.__version__)
try:  # Ultralytics' internals that the adapter builds on (checked for each tested release)
    from ultralytics.engine.model import Model
    from ultralytics.engine.trainer import BaseTrainer  # noqa: F401
    from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: F401
    from ultralytics.models.yolo.model import YOLO  # noqa: F401
    from ultralytics.nn.modules.block import DFL
    from ultralytics.nn.tasks import (
        DetectionModel,
        OBBModel,
        PoseModel,
        SegmentationModel,
    )
    from ultralytics.utils.loss import (
        BboxLoss,  # noqa: F401
        DFLoss,  # noqa: F401
        v8DetectionLoss,  # noqa: F401
        v8PoseLoss,
        v8SegmentationLoss,
    )
    from ultralytics.utils.tal import dist2bbox  # noqa: F401

    from ._classes import T, _fused_subclass, _published_base, _stock_class
    from ._model import (
        FusedDetectionModel,
        _FusedModel,
        _patch_detection_model,
        _unpatch_detection_model,
    )
    from ._modules import FusedDFL, FusedDFLoss, FusedV8DetectionLoss, _FusedDetectionLoss
    from ._training import (
        FusedDetectionTrainer,
        FusedYOLO,
        _FusedTrainer,  # noqa: F401  (re-exported: the adapter's classes name this module as theirs)
        _FusedValidator,  # noqa: F401  (the same)
        _FusedYOLOMixin,
        load_checkpoint,  # noqa: F401  (ultralytics' own, under its older name on older releases)
        patch_trainer,
    )
except ImportError as _err:  # a release without them: say which release, and what is tested
    raise unsupported("ultralytics", ultralytics.__version__, _err) from _err

__all__ = [
    "FusedDFL",
    "FusedDFLoss",
    "FusedDetectionModel",
    "FusedDetectionTrainer",
    "FusedV8DetectionLoss",
    "FusedYOLO",
    "is_patched",
    "patch",
    "patch_trainer",
    "unpatch",
]


# The Ultralytics task classes' fused subclasses exist from import on, so that pickles of patched
# segment / pose / OBB models load in other processes too.
for _base in (SegmentationModel, PoseModel, OBBModel):
    _fused_subclass(_base, _FusedModel)
for _base in (v8SegmentationLoss, v8PoseLoss):
    _fused_subclass(_base, _FusedDetectionLoss)
del _base


# --------------------------------------------------------------------------------------------
# Public entry points


def patch(model: T) -> T:
    """Run an Ultralytics detection model's DFL decoding and loss on gfl_ops; returns ``model``.

    Args:
        model: an ``ultralytics.YOLO`` (any ``ultralytics.engine.model.Model`` holding a PyTorch
            ``DetectionModel``) or a ``DetectionModel`` (``yolo.model``; segment / pose / OBB
            models are ``DetectionModel`` subclasses and get the same treatment where their parts
            are the stock ones).  Patched in place; patching again does nothing more.

    Returns:
        The same object.  See the module docstring for what changes.

    Raises:
        TypeError: ``model`` is neither, or a ``YOLO`` wrapping an exported (non-PyTorch) model.
    """
    if isinstance(model, Model):
        inner = model._modules.get("model")
        if not isinstance(inner, DetectionModel):
            raise TypeError(
                "patch() needs a YOLO object holding a PyTorch DetectionModel, got "
                f"one holding {type(model.model).__name__}"
            )
        _patch_detection_model(inner, warn=True)
        model.__class__ = _fused_subclass(type(model), _FusedYOLOMixin)
        model.predictor = None  # rebuilt by the next predict() around the patched model
        return model
    if isinstance(model, DetectionModel):
        return _patch_detection_model(model, warn=True)
    raise TypeError(
        f"patch() takes an ultralytics YOLO object or a DetectionModel, got {type(model).__name__}"
    )


def unpatch(model: T) -> T:
    """Undo :func:`patch` in place (stock classes and modules, same weights); returns ``model``."""
    if isinstance(model, Model):
        inner = model._modules.get("model")
        if isinstance(inner, DetectionModel):
            _unpatch_detection_model(inner)
        model.__class__ = _stock_class(type(model))
        model.predictor = None
        return model
    if isinstance(model, DetectionModel):
        return _unpatch_detection_model(model)
    raise TypeError(
        "unpatch() takes an ultralytics YOLO object or a DetectionModel, got "
        f"{type(model).__name__}"
    )


def __getattr__(name: str) -> Any:
    """A fused trainer class made in the process that started this one (a multi-GPU worker
    importing its trainer class by name, or unpickling it): made again here."""
    base = _published_base(name)
    if base is not None:
        cls = patch_trainer(base)
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_patched(model: Any) -> bool:
    """Whether ``model`` (a ``YOLO`` or ``DetectionModel``) is patched: fused classes and no stock
    ``DFL`` module left."""
    if isinstance(model, Model):
        return isinstance(model, _FusedYOLOMixin) and is_patched(model._modules.get("model"))
    return isinstance(model, _FusedModel) and not any(type(m) is DFL for m in model.modules())
