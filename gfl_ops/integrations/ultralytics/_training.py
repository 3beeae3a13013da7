"""Training with the fused ops: Ultralytics trainers made fused, and the patched ``YOLO`` class.

Ultralytics' trainer builds a *new* DetectionModel (``get_model``), so patching the model object
alone would be lost.  A fused trainer (:func:`patch_trainer`, :class:`FusedDetectionTrainer`)
patches the model it builds or is given (hence also its EMA copy and resumed / DDP runs) and the
best checkpoint it validates at the end, and writes its checkpoints with the stock classes.
:class:`FusedYOLO` (a patched ``YOLO``) trains with such a trainer, re-patches ``yolo.model``
after ``train()`` reloads it, tunes with each trial's process under ``gfl-yolo`` and writes a
stock checkpoint in ``save()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ultralytics.engine.trainer import BaseTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.model import YOLO
from ultralytics.nn.tasks import DetectionModel

try:
    from ultralytics.nn.tasks import load_checkpoint
except ImportError:  # releases before ~8.3.2xx name the same function attempt_load_one_weight
    from ultralytics.nn.tasks import attempt_load_one_weight as load_checkpoint

from ._classes import _fused_subclass, _homed, _register
from ._model import _patch_detection_model, _patch_if_model, _stock_while
from ._tuning import trials_run_fused


@_homed
class _FusedTrainer:
    """Mixin over an Ultralytics trainer class: every model it trains or validates is patched,
    and the checkpoints it writes hold the stock classes."""

    def get_model(self, *args: Any, **kwargs: Any) -> Any:
        return _patch_if_model(super().get_model(*args, **kwargs))

    def setup_model(self) -> Any:
        # also covers a model handed over already built (YOLO.train, resume, DDP workers)
        ckpt = super().setup_model()
        _patch_if_model(self.model)
        return ckpt

    def save_model(self) -> Any:
        # the checkpoint is a pickle of the EMA model: write it with the stock classes
        with _stock_while(getattr(getattr(self, "ema", None), "ema", None)):
            return super().save_model()

    def final_eval(self) -> Any:
        # Ultralytics validates best.pt by path, i.e. a stock model loaded from the checkpoint:
        # the validator loads it patched instead, for this call only (its class switched back
        # after).  Through __call__, which every release since 8.3.0 has, rather than the
        # validator's get_model, which older releases lack.
        validator = getattr(self, "validator", None)
        if validator is None:
            return super().final_eval()
        stock = type(validator)
        validator.__class__ = _fused_subclass(stock, _FusedValidator)
        try:
            return super().final_eval()
        finally:
            validator.__class__ = stock


@_homed
class _FusedValidator:
    """Mixin over an Ultralytics validator: a ``.pt`` checkpoint given by path (what
    ``final_eval`` validates) is loaded and patched here, and the validator gets the model (its
    AutoBackend takes an ``nn.Module`` as it takes a path)."""

    def __call__(self, trainer: Any = None, model: Any = None, **kwargs: Any) -> Any:
        if trainer is None and isinstance(model, (str, Path)) and str(model).endswith(".pt"):
            model = _patch_if_model(load_checkpoint(model)[0])
        return super().__call__(trainer, model, **kwargs)


@_homed
class FusedDetectionTrainer(_FusedTrainer, DetectionTrainer):
    """``DetectionTrainer`` whose models (trained, EMA, validated) run on gfl_ops.

    For users who build trainers themselves: ``FusedDetectionTrainer(overrides=...).train()`` or
    ``YOLO(...).train(trainer=FusedDetectionTrainer, ...)``; :func:`patch_trainer` makes the same
    for any trainer class.
    """


_register(FusedDetectionTrainer, DetectionTrainer, _FusedTrainer)


def patch_trainer(trainer: type[BaseTrainer] | BaseTrainer) -> Any:
    """Make an Ultralytics trainer train, and validate, patched models.

    Args:
        trainer: a trainer class (e.g. ``DetectionTrainer`` or a user subclass) -> returns its
            fused subclass (:class:`FusedDetectionTrainer` for ``DetectionTrainer``; cached), for
            ``YOLO.train(trainer=...)`` or to instantiate; or a trainer instance -> patched in
            place (class switched; its model and EMA patched if already built) and returned.

    Raises:
        TypeError: ``trainer`` is not an Ultralytics trainer class or instance.
    """
    if isinstance(trainer, type):
        if not issubclass(trainer, BaseTrainer):
            raise TypeError(
                "patch_trainer() takes an Ultralytics trainer class or instance, got "
                f"class {trainer.__name__}"
            )
        return _fused_subclass(trainer, _FusedTrainer, by_name=False)
    if not isinstance(trainer, BaseTrainer):
        raise TypeError(
            "patch_trainer() takes an Ultralytics trainer class or instance, got "
            f"{type(trainer).__name__}"
        )
    trainer.__class__ = _fused_subclass(type(trainer), _FusedTrainer, by_name=False)
    _patch_if_model(getattr(trainer, "model", None))
    _patch_if_model(getattr(getattr(trainer, "ema", None), "ema", None))
    return trainer


@_homed
class _FusedYOLOMixin:
    """Mixin over ``YOLO`` (any ``ultralytics.engine.model.Model``)."""

    def train(self, trainer: type[BaseTrainer] | None = None, **kwargs: Any) -> Any:
        """``YOLO.train`` with the task's trainer (or ``trainer``) made fused by
        :func:`patch_trainer`; ``self.model`` is patched again after training."""
        fused = patch_trainer(trainer or self._smart_load("trainer"))
        try:
            return super().train(trainer=fused, **kwargs)
        finally:
            # train() reloads self.model from the (stock) checkpoint it wrote
            if isinstance(self._modules.get("model"), DetectionModel):
                _patch_detection_model(self.model)
                self.predictor = None

    def tune(self, *args: Any, **kwargs: Any) -> Any:
        """``YOLO.tune`` whose trials train with the fused ops: Ultralytics starts each trial as
        a ``yolo train`` process, which runs as ``gfl-yolo train`` instead
        (:func:`~._tuning.trials_run_fused`).  The model is stock for the span of the call, so
        that the base checkpoint the trials start from is a stock one.  (``use_ray=True``: Ray's
        trials call ``train()`` on a copy of this patched object, i.e. the fused trainer; not
        tested here, Ray is not installed.)"""
        with trials_run_fused(), _stock_while(self._modules.get("model")):
            return super().tune(*args, **kwargs)

    def save(self, filename: str | Path = "saved_model.pt") -> None:
        """``YOLO.save`` writing the stock classes (loadable without gfl_ops)."""
        with _stock_while(self._modules.get("model")):
            super().save(filename)


@_homed
class FusedYOLO(_FusedYOLOMixin, YOLO):
    """The class of a patched ``YOLO`` object."""


_register(FusedYOLO, YOLO, _FusedYOLOMixin)
