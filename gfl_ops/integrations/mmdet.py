"""mmdetection (3.x) adapter: gfl_ops' fused QFL, DFL and integral as mmdet modules.

Importing this module registers three modules in ``mmdet.registry.MODELS`` and one hook in
``HOOKS``; ``import gfl_ops`` alone never imports mmdet::

    import gfl_ops.integrations.mmdet  # or, in a config: custom_imports=dict(
                                       #     imports=['gfl_ops.integrations.mmdet'])

    loss_cls=dict(type='FusedQualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0)
    loss_dfl=dict(type='FusedDistributionFocalLoss', loss_weight=0.25)

or, for a model that is already built (a head or a whole detector; this also covers the GFL
head's ``Integral``, which mmdet constructs directly rather than from the config)::

    from gfl_ops.integrations.mmdet import fuse
    model = fuse(model)

or, with mmdet's tools and a config alone, ``custom_hooks = [dict(type='FuseGFLOpsHook')]``,
which fuses the runner's model when a run starts (:class:`FuseGFLOpsHook`).

* :class:`FusedQualityFocalLoss`, :class:`FusedDistributionFocalLoss` and :class:`FusedIntegral`
  subclass mmdet's ``QualityFocalLoss``, ``DistributionFocalLoss`` and
  ``mmdet.models.dense_heads.gfl_head.Integral``: mmdet's own constructors (arguments,
  attributes, the ``use_sigmoid`` assertion), the ``project`` buffer and state-dict keys, and
  ``isinstance`` checks in mmdet's heads (DETR / DINO pick their QFL targets with
  ``isinstance(self.loss_cls, QualityFocalLoss)``) all stay mmdet's.  The only constructor
  addition is an optional ``backend=`` (see :func:`gfl_ops.available_backends`).
* ``forward`` has mmdet's signature.  The unreduced loss comes from :mod:`gfl_ops.functional`
  (fused kernels); ``weight``, ``reduction``, ``reduction_override`` and ``avg_factor`` are then
  applied by mmdet's own ``weight_reduce_loss``, so they behave exactly as in mmdet: a weight is
  multiplied in with broadcasting (an (N, 1) weight on the (N,) loss gives mmdet's (N, N)), a
  ``(1,)``-tensor ``avg_factor`` gives a ``(1,)`` result, ``avg_factor`` with ``'sum'`` raises
  ``ValueError``, an invalid ``reduction_override`` raises ``AssertionError``.  QFL labels
  outside ``[0, C)`` (-1, C, > C) are background, as in mmdet.

Deliberate differences from mmdet (everything else is mmdet's result, shape and dtype):

* ``reduction='mean'`` without ``avg_factor`` over an empty loss gives 0 (mmdet: NaN), with the
  autograd graph kept, so an image without anchors cannot poison a training step.
* DFL: a target equal to ``reg_max`` (the last bin) is exact; mmdet indexes the bin
  ``reg_max + 1``, which does not exist (an index error on CPU, a device assert on CUDA).
  mmdet's GFL head clamps its targets to ``reg_max - 0.01``, so it never gets there.
* gfl_ops' value checks apply: QFL scores / dense targets outside [0, 1], DFL targets outside
  [0, reg_max], NaN targets, ``activated=True`` predictions outside [0, 1] and a negative
  ``beta`` raise ``ValueError`` where mmdet computes a meaningless loss or fails inside torch
  (see :func:`gfl_ops.set_value_checks`).
* dtypes: the loss of a float16 / bfloat16 ``pred`` is float32 (gfl_ops computes in float32, and
  a float32 loss cannot overflow when summed under AMP); mmdet's QFL returns the 16-bit dtype
  and first rounds a float32 dense target to it, which we do not.  For float32 / float64 inputs
  the result dtype is mmdet's.  Gradients have the dtype of ``pred``.  The integral of a 16-bit
  input is computed in float32 and returned in the input dtype (mmdet takes the softmax in 16
  bits).
* A dense QFL target that requires grad gets the derivative of the QFL formula everywhere;
  mmdet's masked write (``loss[target != 0] = ...``) gives 0 at the entries where the target is
  exactly 0 although the loss does depend on them there.  Elsewhere, and for ``(labels,
  scores)`` targets and DFL targets, target gradients are mmdet's.
* Shapes: QFL with ``(labels, scores)`` and DFL take a 2-D ``pred`` (the shapes mmdet
  documents); a dense QFL target may, as in mmdet, be (N, C, ...) with a ``pred`` of the same
  shape, giving an (N, ...) loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import mmdet
import torch
from torch import nn

from gfl_ops import functional
from gfl_ops.modules import ProjectCheck, project_problem

from ._versions import unsupported, warn_if_older_than_tested

warn_if_older_than_tested("mmdet", mmdet.__version__)
try:
    from mmdet.models.dense_heads.gfl_head import Integral as _MMDetIntegral
    from mmdet.models.losses.gfocal_loss import DistributionFocalLoss as _MMDetDFL
    from mmdet.models.losses.gfocal_loss import QualityFocalLoss as _MMDetQFL
    from mmdet.models.losses.utils import weight_reduce_loss as _mmdet_weight_reduce_loss
    from mmdet.registry import HOOKS, MODELS
    from mmengine.hooks import Hook
except ImportError as err:  # pragma: no cover - depends on the environment
    if err.name == "mmcv._ext":
        raise ImportError(
            "gfl_ops.integrations.mmdet needs mmdet's models, which need mmcv's compiled ops "
            "(mmcv._ext): install full mmcv (not mmcv-lite), e.g. `mim install mmcv`"
        ) from err
    # mmdetection 2.x (no mmdet.registry), or a release without these modules
    raise unsupported("mmdet", mmdet.__version__, err) from err

__all__ = [
    "FusedQualityFocalLoss",
    "FusedDistributionFocalLoss",
    "FusedIntegral",
    "FuseGFLOpsHook",
    "fuse",
]

AvgFactor = Union[float, int, torch.Tensor, None]
QFLTarget = Union[Sequence[torch.Tensor], torch.Tensor]

_REDUCTION_OVERRIDES = (None, "none", "mean", "sum")


def _reduction(default: str, override: object) -> str:
    # mmdet: ``assert reduction_override in (None, 'none', 'mean', 'sum')``; raised explicitly so
    # that it also holds under ``python -O``
    if override not in _REDUCTION_OVERRIDES:
        raise AssertionError(
            f"reduction_override must be None, 'none', 'mean' or 'sum', got {override!r}"
        )
    return override if override else default  # type: ignore[return-value]


def _weight_reduce_loss(
    loss: torch.Tensor, weight: torch.Tensor | None, reduction: str, avg_factor: AvgFactor
) -> torch.Tensor:
    """mmdet's ``weight_reduce_loss``, except that the plain mean of an empty loss is 0."""
    if weight is not None:
        loss = loss * weight  # mmdet's broadcasting, whatever the weight's shape
    if reduction == "mean" and avg_factor is None and loss.numel() == 0:
        return loss.sum()  # mmdet: loss.mean() = NaN
    return _mmdet_weight_reduce_loss(loss, None, reduction, avg_factor)


@MODELS.register_module()
class FusedQualityFocalLoss(_MMDetQFL):
    """mmdet's ``QualityFocalLoss`` computed by gfl_ops' fused kernels.

    Args:
        use_sigmoid: must be True (mmdet asserts it).
        beta: modulating exponent, >= 0.
        reduction: default reduction, 'none' | 'mean' | 'sum'.
        loss_weight: multiplier applied to the loss.
        activated: ``pred`` holds probabilities in [0, 1] instead of logits.
        backend: gfl_ops backend ('cpu' | 'cuda' | 'triton' | 'reference'); None picks one.
    """

    backend: str | None = None  # class default: also set on modules converted by :func:`fuse`

    def __init__(
        self,
        use_sigmoid: bool = True,
        beta: float = 2.0,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            use_sigmoid=use_sigmoid,
            beta=beta,
            reduction=reduction,
            loss_weight=loss_weight,
            activated=activated,
        )
        self.backend = backend

    def forward(
        self,
        pred: torch.Tensor,
        target: QFLTarget,
        weight: torch.Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: str | None = None,
    ) -> torch.Tensor:
        """Quality Focal Loss, summed over classes.

        Args:
            pred: (N, C) floating logits (probabilities with ``activated=True``).
            target: ``(labels, scores)``: labels (N,) integer, a class in [0, C) or anything
                else (C, -1, ...) for background, and scores (N,) floating IoU targets in
                [0, 1]; or a dense floating soft target of ``pred``'s shape, (N, C) or
                (N, C, ...).
            weight: per-anchor weight, (N,) (or anything mmdet multiplies with the loss).
            avg_factor: with 'mean', the result is ``sum / (avg_factor + eps)``: a number, a 0-d
                tensor or a (1,) tensor (then the result has shape (1,), as in mmdet).
            reduction_override: None | 'none' | 'mean' | 'sum'.

        Returns:
            'none': (N,) (dense (N, C, ...) target: (N, ...)); otherwise 0-d (or (1,), see
            ``avg_factor``).  float32 for fp16/bf16 ``pred``, else ``pred.dtype``.
        """
        reduction = _reduction(self.reduction, reduction_override)
        if not self.use_sigmoid:  # as mmdet, should ``use_sigmoid`` be changed after __init__
            raise NotImplementedError("QualityFocalLoss is only defined with use_sigmoid=True")
        if isinstance(target, torch.Tensor):
            loss = self._dense_loss(pred, target)
        else:
            if len(target) != 2:  # mmdet asserts this
                raise AssertionError(
                    "target for QFL must be a tuple of two elements: the "
                    f"labels and the quality scores; got {len(target)}"
                )
            loss = functional.quality_focal_loss(
                pred,
                tuple(target),
                reduction="none",
                beta=self.beta,
                activated=self.activated,
                backend=self.backend,
            )
        return self.loss_weight * _weight_reduce_loss(loss, weight, reduction, avg_factor)

    def _dense_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.size() != target.size():  # mmdet asserts this
            raise AssertionError(
                "a dense QFL target must have the shape of pred "
                f"{tuple(pred.shape)}, got {tuple(target.shape)}"
            )
        if not target.is_floating_point():  # integer / bool one-hot: mmdet's type_as(pred)
            target = target.to(pred.dtype)
        # a floating target is used as given: gfl_ops computes in float32 (float64), so there is
        # no need for mmdet's rounding of a float32 target to a 16-bit pred's dtype
        kwargs = dict(
            reduction="none", beta=self.beta, activated=self.activated, backend=self.backend
        )
        if pred.dim() <= 2:
            return functional.quality_focal_loss(pred, target, **kwargs)
        # (N, C, ...): classes to the last dimension, one row per (n, ...) position
        num_classes = pred.size(1)
        rows = functional.quality_focal_loss(
            pred.movedim(1, -1).reshape(-1, num_classes),
            target.movedim(1, -1).reshape(-1, num_classes),
            **kwargs,
        )
        return rows.reshape(pred.shape[:1] + pred.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, reduction={self.reduction!r}, loss_weight={self.loss_weight}, "
            f"activated={self.activated}, backend={self.backend!r}"
        )


@MODELS.register_module()
class FusedDistributionFocalLoss(_MMDetDFL):
    """mmdet's ``DistributionFocalLoss`` computed by gfl_ops' fused kernels.

    Args:
        reduction: default reduction, 'none' | 'mean' | 'sum'.
        loss_weight: multiplier applied to the loss.
        backend: gfl_ops backend; None picks one.
    """

    backend: str | None = None

    def __init__(
        self, reduction: str = "mean", loss_weight: float = 1.0, backend: str | None = None
    ) -> None:
        super().__init__(reduction=reduction, loss_weight=loss_weight)
        self.backend = backend

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        avg_factor: AvgFactor = None,
        reduction_override: str | None = None,
    ) -> torch.Tensor:
        """Distribution Focal Loss per row.

        Args:
            pred: (M, n+1) floating logits over the bins 0..n (n = reg_max).
            target: (M,) distances in [0, n] (n itself is exact here; see the module docstring).
            weight, avg_factor, reduction_override: as in :class:`FusedQualityFocalLoss`.

        Returns:
            'none': (M,); otherwise 0-d (or (1,) for a (1,) ``avg_factor``).  float32 for
            fp16/bf16 ``pred``, else ``pred.dtype``.
        """
        reduction = _reduction(self.reduction, reduction_override)
        if isinstance(target, torch.Tensor) and not target.is_floating_point():
            target = target.float()  # mmdet's arithmetic promotes integer targets to float32
        loss = functional.distribution_focal_loss(
            pred, target, reduction="none", backend=self.backend
        )
        return self.loss_weight * _weight_reduce_loss(loss, weight, reduction, avg_factor)

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, loss_weight={self.loss_weight}, "
            f"backend={self.backend!r}"
        )


@MODELS.register_module()
class FusedIntegral(ProjectCheck, _MMDetIntegral):
    """mmdet's GFL ``Integral`` computed by gfl_ops' fused softmax-integral kernel.

    Holds mmdet's persistent ``project`` buffer (``linspace(0, reg_max, reg_max + 1)``), so
    state dicts keep the key ``<prefix>project`` and load with ``strict=True`` both ways.  The
    kernel uses the bin indices 0..reg_max, which are exactly those values; loading a state dict
    whose ``project`` holds anything else is an error rather than silently ignored.  During ONNX
    export the module runs mmdet's Softmax + Linear formula (the fused op has no ONNX symbolic).

    Args:
        reg_max: the largest bin value n; the input has 4*(n+1) logits per box.
        backend: gfl_ops backend; None picks one.
    """

    backend: str | None = None

    def __init__(self, reg_max: int = 16, backend: str | None = None) -> None:
        super().__init__(reg_max=reg_max)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 4*(reg_max+1)) floating logits (as mmdet, any shape whose size is a multiple
        of 4*(reg_max+1)) -> (N, 4) expected distances in [0, reg_max], dtype of ``x``."""
        # (ONNX export: functional.integral lowers to Softmax + MatMul itself)
        bins = self.reg_max + 1
        return functional.integral(x.reshape(-1, bins), backend=self.backend).reshape(-1, 4)

    def extra_repr(self) -> str:
        return f"reg_max={self.reg_max}, backend={self.backend!r}"


# exact mmdet type -> fused type.  Only exact types: a user subclass may override forward.
_FUSED_TYPES: dict[type, type] = {
    _MMDetQFL: FusedQualityFocalLoss,
    _MMDetDFL: FusedDistributionFocalLoss,
    _MMDetIntegral: FusedIntegral,
}


def fuse(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Make every mmdet QFL, DFL and GFL ``Integral`` inside ``model`` use gfl_ops, in place.

    Walks ``model.modules()`` (a head, a detector, any ``nn.Module``) and converts each module
    whose type is exactly mmdet's ``QualityFocalLoss``, ``DistributionFocalLoss`` or
    ``mmdet.models.dense_heads.gfl_head.Integral`` (as in GFL, LD and other heads built on them)
    to :class:`FusedQualityFocalLoss`, :class:`FusedDistributionFocalLoss` or
    :class:`FusedIntegral`.  The conversion changes the module's class and nothing else (as
    ``torch.nn.utils.parametrize`` does): it stays the same object with the same settings,
    buffers, hooks and device, so references held elsewhere, shared modules and the state dict
    (keys and values) are unchanged, and checkpoints load with ``strict=True`` either way.

    Subclasses of mmdet's classes are left alone (they may override ``forward``), and so are
    loss objects that are not submodules of ``model``.

    Args:
        model: the built model; changed in place.
        backend: gfl_ops backend for the converted modules (None: chosen per call).  Given, it
            is also set on modules that are already fused.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: an ``Integral``'s ``project`` buffer is not ``linspace(0, reg_max,
            reg_max + 1)`` (the fused kernel could not honour it); nothing is converted then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in _FUSED_TYPES or isinstance(module, tuple(_FUSED_TYPES.values()))
    ]
    for name, module in found:  # all checks before any change
        if isinstance(module, _MMDetIntegral):
            problem = project_problem(module.project, module.reg_max)
            if problem is not None:
                raise ValueError(f"cannot fuse {name or type(model).__name__}: {problem}")
    for _, module in found:
        fused_type = _FUSED_TYPES.get(type(module))
        if fused_type is not None:
            module.__class__ = fused_type
            module.backend = backend
        elif backend is not None:
            module.backend = backend
    return model


@HOOKS.register_module()
class FuseGFLOpsHook(Hook):
    """Fuse the runner's model (:func:`fuse`) when a run starts: for users who train and test
    with mmdet's tools and configs only.  Naming the fused losses in a config cannot reach the
    GFL head's ``Integral``, which mmdet builds in code; this hook converts it too::

        custom_imports = dict(imports=['gfl_ops.integrations.mmdet'], allow_failed_imports=False)
        custom_hooks = [dict(type='FuseGFLOpsHook')]  # optionally backend='cuda' / 'triton'

    ``before_run`` comes in ``runner.train()``, ``val()`` and ``test()`` alike, before weights
    are initialised or a checkpoint is loaded (fusing changes no parameter, buffer or state-dict
    key, so either order gives the same model), and, with priority ``VERY_HIGH``, before
    ``EMAHook`` copies the model (its copy is then fused too).  A model wrapped for DDP is fused
    through the wrapper.
    """

    priority = "VERY_HIGH"

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend

    def before_run(self, runner: Any) -> None:  # runner: mmengine.runner.Runner
        fuse(runner.model, backend=self.backend)
