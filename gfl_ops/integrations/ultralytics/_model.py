"""Patching a built ``DetectionModel`` in place, and back: its class and its DFL modules.

``_patch_detection_model`` switches the model's class to ``Fused<class>``
(:class:`FusedDetectionModel` for ``DetectionModel``), whose ``init_criterion`` builds a fused
loss, patches a loss already built, and replaces every stock ``DFL`` module by a
:class:`FusedDFL` sharing its ``conv``; ``_unpatch_detection_model`` undoes it, and
``_stock_while`` does so for the span of a checkpoint write.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn
from ultralytics.nn.modules.block import DFL
from ultralytics.nn.tasks import DetectionModel

from ._classes import T, _fused_subclass, _homed, _register, _stock_class
from ._modules import FusedDFL, _patch_criterion, _unpatch_criterion


@_homed
class _FusedModel:
    """Mixin over a ``DetectionModel`` class: the loss it builds runs on the fused ops."""

    def init_criterion(self) -> Any:
        return _patch_criterion(super().init_criterion())


@_homed
class FusedDetectionModel(_FusedModel, DetectionModel):
    """The class of a patched ``DetectionModel``.  Its subclasses (segment, pose, OBB, ...) become
    ``Fused<name>`` classes made alike."""


_register(FusedDetectionModel, DetectionModel, _FusedModel)


def _swap_dfl(model: nn.Module, fused: bool) -> int:
    """Replace every stock ``DFL`` by a ``FusedDFL`` (or back); returns how many there are."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is DFL:  # exactly: a subclass may compute something else
                if fused:
                    setattr(parent, name, FusedDFL.from_stock(child))
                count += 1
            elif type(child) is FusedDFL:
                if not fused:
                    setattr(parent, name, child.to_stock())
                count += 1
    return count


def _patch_detection_model(model: DetectionModel, warn: bool = False) -> DetectionModel:
    # (warn: for the user's patch() call only, not each time a trainer patches its models)
    if not _swap_dfl(model, fused=True) and warn:
        warnings.warn(
            f"patch(): {type(model).__name__} has no DFL module: a reg_max == 1 head "
            "(e.g. YOLO26) regresses distances directly, so no fused op will run",
            stacklevel=3,
        )
    model.__class__ = _fused_subclass(type(model), _FusedModel)
    criterion = getattr(model, "criterion", None)
    if criterion is not None:  # already built: patch it too (otherwise init_criterion will)
        _patch_criterion(criterion)
    return model


def _unpatch_detection_model(model: DetectionModel) -> DetectionModel:
    _swap_dfl(model, fused=False)
    model.__class__ = _stock_class(type(model))
    criterion = getattr(model, "criterion", None)
    if criterion is not None:
        _unpatch_criterion(criterion)
    return model


def _patch_if_model(model: T) -> T:
    if isinstance(model, DetectionModel):
        _patch_detection_model(model)
    return model


@contextlib.contextmanager
def _stock_while(model: Any) -> Iterator[None]:
    """Unpatch ``model`` (if patched) for the duration, e.g. of a checkpoint write."""
    patched = isinstance(model, _FusedModel)
    if patched:
        _unpatch_detection_model(model)
    try:
        yield
    finally:
        if patched:
            _patch_detection_model(model)
