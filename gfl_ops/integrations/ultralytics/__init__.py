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
  and resumed / DDP runs) and the best checkpoint it validates at the end; ``train()`` re-patches
  ``yolo.model`` after reloading the trained checkpoint.  ``YOLO.tune()`` and the CLI are not
  covered (they start trainers of their own).

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
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from ultralytics.engine.model import Model
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.model import YOLO
from ultralytics.nn.modules.block import DFL
from ultralytics.nn.tasks import (
    DetectionModel,
    OBBModel,
    PoseModel,
    SegmentationModel,
    load_checkpoint,
)
from ultralytics.utils.loss import (
    BboxLoss,
    DFLoss,
    v8DetectionLoss,
    v8PoseLoss,
    v8SegmentationLoss,
)
from ultralytics.utils.tal import dist2bbox

# The module, not its functions: the fused ops are looked up at call time (the tests count calls
# by wrapping these entry points).
from gfl_ops import functional

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

T = TypeVar("T")


def _exporting() -> bool:
    """Whether the module is being exported / traced rather than run (the graph must then hold
    standard ops only).  Both ``torch.onnx.export`` exporters (``dynamo=False``, which Ultralytics
    uses, and ``dynamo=True``) report ``is_in_onnx_export()`` (checked on torch 2.14);
    ``torch.export`` reports ``is_exporting()``; ``torch.jit.trace`` (TorchScript, CoreML, ...)
    ``is_tracing()``."""
    return (torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
            or torch.jit.is_tracing() or torch.jit.is_scripting())


# --------------------------------------------------------------------------------------------
# Fused subclasses of Ultralytics classes.  A model, loss, trainer or YOLO object is patched by
# switching its class to the subclass (and back by unpatch), which keeps its identity, state and
# every reference to it; DFL modules are replaced by FusedDFL modules sharing their conv.

_STOCK: dict[type, type] = {}  # fused class -> the Ultralytics class it extends
_FUSED: dict[tuple[type, type], type] = {}  # (Ultralytics class, mixin) -> fused class


def _register(cls: T, base: type, mixin: type) -> T:
    _STOCK[cls] = base
    _FUSED[(base, mixin)] = cls
    return cls


def _fused_subclass(base: type, mixin: type, by_name: bool = True) -> type:
    """``mixin`` over ``base``: a predefined class, or one made (and cached) here.

    ``by_name``: put a made class in this module's namespace, so that pickle finds it by name
    (models, losses: ``torch.save``); the Ultralytics task classes have theirs made at import, so
    other processes find them too.  Trainer classes are left out: Ultralytics' DDP launcher
    cloudpickles ``type(trainer)``, which works for a made class only by value, i.e. when it is
    not found by name."""
    if issubclass(base, mixin):
        return base
    cls = _FUSED.get((base, mixin))
    if cls is None:
        name = f"Fused{base.__name__}"
        while by_name and name in globals():  # same-named classes from different modules
            name += "_"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name,
                                         "__doc__": f"{base.__name__} patched by gfl_ops."})
        _register(cls, base, mixin)
        if by_name:
            globals()[name] = cls
    return cls


def _stock_class(cls: type) -> type:
    return _STOCK.get(cls, cls)


# --------------------------------------------------------------------------------------------
# The head's DFL module


class FusedDFL(DFL):
    """Ultralytics' ``DFL`` (box decoding of the Detect head) computed by :func:`gfl_ops.integral`.

    ``forward(x)``: x (B, 4 * c1, A) logits, channel-first as the head emits them (side-major:
    channel ``s * c1 + j`` is bin ``j`` of side ``s``) -> (B, 4, A) expected distances in
    ``[0, c1 - 1]``, dtype of ``x``.  ``c1`` is Ultralytics' ``reg_max`` (the number of bins).

    It keeps the stock module's frozen 1x1 ``conv`` (weight (1, c1, 1, 1) = ``arange(c1)``), so the
    state dict is unchanged.  The fused op computes exactly that projection; if the weight is not
    ``arange(c1)`` (someone loaded other weights), the module warns and runs the stock
    softmax + convolution instead, which honours any weight.  The weight is compared on every
    eager call on CPU (16 values), and on other devices whenever the tensor changes (new storage,
    dtype or device, or an in-place write seen by autograd such as ``load_state_dict``: one host
    sync each time); raw ``.data`` writes to an accelerator tensor are not seen.  Under
    ``torch.compile`` the last eager verdict holds.  During export or tracing it runs the stock
    computation.
    """

    def __init__(self, c1: int = 16) -> None:
        super().__init__(c1)
        self._checked: tuple | None = None
        self._integral_weight = True
        self._weight_is_integral()

    @classmethod
    def from_stock(cls, dfl: DFL) -> FusedDFL:
        """A fused module sharing ``dfl``'s ``conv`` (the same Parameter), mode and hooks."""
        new = cls.__new__(cls)
        new.__setstate__(_module_state(dfl))
        new._checked = None
        new._integral_weight = True
        new._weight_is_integral()
        return new

    def to_stock(self) -> DFL:
        """The stock ``DFL`` with this module's ``conv``, mode and hooks."""
        stock = DFL.__new__(DFL)
        state = _module_state(self)
        for name in ("_checked", "_integral_weight"):
            state.pop(name, None)
        stock.__setstate__(state)
        return stock

    def _weight_is_integral(self) -> bool:
        if torch.compiler.is_compiling():
            return self._integral_weight
        w = self.conv.weight
        # (inference tensors, e.g. loaded under torch.inference_mode, have no version counter)
        key = (w.device, w.dtype, w.data_ptr(), -1 if w.is_inference() else w._version)
        if w.device.type == "cpu" or key != self._checked:
            ok = tuple(w.shape) == (1, self.c1, 1, 1) and torch.equal(
                w.detach().reshape(-1), torch.arange(self.c1, dtype=w.dtype, device=w.device))
            if not ok and (self._integral_weight or self._checked is None):
                warnings.warn("FusedDFL: conv.weight is not arange(reg_max); running the stock "
                              "softmax + convolution, which honours it", stacklevel=3)
            self._checked, self._integral_weight = key, ok
        return self._integral_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting() or not self._weight_is_integral():
            return super().forward(x)
        b, _, a = x.shape
        # (B, 4*c1, A) -> (B, 4, A, c1): the op reduces over the last dimension
        return functional.integral(x.view(b, 4, self.c1, a).transpose(2, 3))


def _module_state(module: nn.Module) -> dict:
    # nn.Module state with its dicts and sets (submodules, parameters, hooks) copied, not shared
    return {k: v.copy() if isinstance(v, (dict, set)) else v
            for k, v in module.__getstate__().items()}


# --------------------------------------------------------------------------------------------
# The loss


class FusedDFLoss(DFLoss):
    """Ultralytics' ``DFLoss`` computed by :func:`gfl_ops.distribution_focal_loss`.

    ``__call__(pred_dist, target)``: pred_dist (M, reg_max) logits, any float dtype (Ultralytics
    passes (4 * P, reg_max) for P boxes); target (..., k) distances in bins with
    ``target.numel() == M`` ((P, 4) in Ultralytics) -> (..., 1): the loss averaged over the last
    dimension (a box's sides).  float32 for 16-bit ``pred_dist`` (what Ultralytics' formula gives
    under autocast), else ``pred_dist.dtype``.  As in Ultralytics the target is clamped to
    ``[0, reg_max - 1 - 0.01]``, but not in place.
    """

    def __call__(self, pred_dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.clamp(0, self.reg_max - 1 - 0.01)
        # clamped into range just above, so the value check (a host sync per call on a GPU)
        # could only find a NaN, which gives a NaN row here exactly as in Ultralytics' formula
        loss = functional.distribution_focal_loss(pred_dist, target.reshape(-1), reduction="none",
                                                  check_values=False)
        return loss.view(target.shape).mean(-1, keepdim=True)


class _FusedDetectionLoss:
    """Mixin over ``v8DetectionLoss`` (or a subclass that keeps its ``bbox_decode``)."""

    def bbox_decode(self, anchor_points: torch.Tensor, pred_dist: torch.Tensor) -> torch.Tensor:
        """pred_dist (B, A, 4 * reg_max) logits, anchor_points (A, 2) -> (B, A, 4) xyxy boxes in
        grid units, dtype of ``pred_dist`` (as Ultralytics' softmax-matmul under autocast)."""
        if self.use_dfl:
            b, a, c = pred_dist.shape
            pred_dist = functional.integral(pred_dist.view(b, a, 4, c // 4))
        return dist2bbox(pred_dist, anchor_points, xywh=False)


class FusedV8DetectionLoss(_FusedDetectionLoss, v8DetectionLoss):
    """The class of a patched model's ``v8DetectionLoss``."""


_register(FusedV8DetectionLoss, v8DetectionLoss, _FusedDetectionLoss)


def _is_loss_wrapper(obj: object) -> bool:
    # E2ELoss / E2EDetectLoss (one2many, one2one), TVPDetectLoss (vp_criterion), ...
    return type(obj).__module__.startswith("ultralytics.utils.loss")


def _patch_criterion(criterion: T, depth: int = 0) -> T:
    """Switch a built criterion's DFL parts to the fused ones, in place; returns it."""
    if isinstance(criterion, v8DetectionLoss):
        bbox_loss = getattr(criterion, "bbox_loss", None)
        if isinstance(bbox_loss, BboxLoss) and type(bbox_loss.dfl_loss) is DFLoss:
            bbox_loss.dfl_loss = FusedDFLoss(bbox_loss.dfl_loss.reg_max)
        # subclasses with their own decoding (OBB's rotated boxes) keep it; they still get the
        # fused DFL term above
        if type(criterion).bbox_decode is v8DetectionLoss.bbox_decode:
            criterion.__class__ = _fused_subclass(type(criterion), _FusedDetectionLoss)
    elif depth < 2 and _is_loss_wrapper(criterion):
        for value in vars(criterion).values():
            if _is_loss_wrapper(value):
                _patch_criterion(value, depth + 1)
    return criterion


def _unpatch_criterion(criterion: T, depth: int = 0) -> T:
    if isinstance(criterion, v8DetectionLoss):
        bbox_loss = getattr(criterion, "bbox_loss", None)
        if isinstance(bbox_loss, BboxLoss) and type(bbox_loss.dfl_loss) is FusedDFLoss:
            bbox_loss.dfl_loss = DFLoss(bbox_loss.dfl_loss.reg_max)
        criterion.__class__ = _stock_class(type(criterion))
    elif depth < 2 and _is_loss_wrapper(criterion):
        for value in vars(criterion).values():
            if _is_loss_wrapper(value):
                _unpatch_criterion(value, depth + 1)
    return criterion


# --------------------------------------------------------------------------------------------
# The model


class _FusedModel:
    """Mixin over a ``DetectionModel`` class: the loss it builds runs on the fused ops."""

    def init_criterion(self) -> Any:
        return _patch_criterion(super().init_criterion())


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
        warnings.warn(f"patch(): {type(model).__name__} has no DFL module: a reg_max == 1 head "
                      "(e.g. YOLO26) regresses distances directly, so no fused op will run",
                      stacklevel=3)
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


# --------------------------------------------------------------------------------------------
# Training


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
        # hand the validator that model patched, for this call only.
        validator = getattr(self, "validator", None)
        if validator is None:
            return super().final_eval()
        stock_get_model = validator.get_model

        def get_model(model: Any = None, trainer: Any = None, *args: Any, **kwargs: Any) -> Any:
            if trainer is None and isinstance(model, (str, Path)) and str(model).endswith(".pt"):
                model = _patch_if_model(load_checkpoint(model)[0])
            return stock_get_model(model, trainer, *args, **kwargs)

        validator.get_model = get_model
        try:
            return super().final_eval()
        finally:
            del validator.get_model


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
            raise TypeError("patch_trainer() takes an Ultralytics trainer class or instance, got "
                            f"class {trainer.__name__}")
        return _fused_subclass(trainer, _FusedTrainer, by_name=False)
    if not isinstance(trainer, BaseTrainer):
        raise TypeError("patch_trainer() takes an Ultralytics trainer class or instance, got "
                        f"{type(trainer).__name__}")
    trainer.__class__ = _fused_subclass(type(trainer), _FusedTrainer, by_name=False)
    _patch_if_model(getattr(trainer, "model", None))
    _patch_if_model(getattr(getattr(trainer, "ema", None), "ema", None))
    return trainer


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

    def save(self, filename: str | Path = "saved_model.pt") -> None:
        """``YOLO.save`` writing the stock classes (loadable without gfl_ops)."""
        with _stock_while(self._modules.get("model")):
            super().save(filename)


class FusedYOLO(_FusedYOLOMixin, YOLO):
    """The class of a patched ``YOLO`` object."""


_register(FusedYOLO, YOLO, _FusedYOLOMixin)

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
            raise TypeError("patch() needs a YOLO object holding a PyTorch DetectionModel, got "
                            f"one holding {type(model.model).__name__}")
        _patch_detection_model(inner, warn=True)
        model.__class__ = _fused_subclass(type(model), _FusedYOLOMixin)
        model.predictor = None  # rebuilt by the next predict() around the patched model
        return model
    if isinstance(model, DetectionModel):
        return _patch_detection_model(model, warn=True)
    raise TypeError("patch() takes an ultralytics YOLO object or a DetectionModel, got "
                    f"{type(model).__name__}")


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
    raise TypeError("unpatch() takes an ultralytics YOLO object or a DetectionModel, got "
                    f"{type(model).__name__}")


def is_patched(model: Any) -> bool:
    """Whether ``model`` (a ``YOLO`` or ``DetectionModel``) is patched: fused classes and no stock
    ``DFL`` module left."""
    if isinstance(model, Model):
        return isinstance(model, _FusedYOLOMixin) and is_patched(model._modules.get("model"))
    return isinstance(model, _FusedModel) and not any(type(m) is DFL for m in model.modules())
