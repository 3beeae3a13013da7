"""The fused parts that replace Ultralytics' own: the Detect head's DFL module and the loss.

* :class:`FusedDFL`: the head's box decoding (``DFL``) on :func:`gfl_ops.integral`, same
  ``conv`` and state-dict key; the stock computation while exporting or tracing.
* :class:`FusedDFLoss`: the loss's DFL term (``DFLoss``) on
  :func:`gfl_ops.distribution_focal_loss`, and ``_FusedDetectionLoss``, whose ``bbox_decode``
  uses :func:`gfl_ops.integral`; ``_patch_criterion`` / ``_unpatch_criterion`` switch a built
  ``v8DetectionLoss`` (or a wrapper of some, such as ``E2ELoss``) to them and back in place.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from ultralytics.nn.modules.block import DFL
from ultralytics.utils.loss import BboxLoss, DFLoss, v8DetectionLoss
from ultralytics.utils.tal import dist2bbox

# The module, not its functions: the fused ops are looked up at call time (the tests count calls
# by wrapping these entry points).
from gfl_ops import functional
from gfl_ops._torch_compat import is_compiling

from ._classes import T, _fused_subclass, _homed, _register, _stock_class

# torch.compiler.is_exporting exists from torch 2.7 on; before, torch.export is not told apart
# from torch.compile (the fused operator, which has a fake kernel, is then exported as is)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _exporting() -> bool:
    """Whether the module is being exported / traced rather than run (the graph must then hold
    standard ops only).  Both ``torch.onnx.export`` exporters (``dynamo=False``, which Ultralytics
    uses, and ``dynamo=True``) report ``is_in_onnx_export()`` (checked on torch 2.14);
    ``torch.export`` reports ``is_exporting()`` (torch >= 2.7); ``torch.jit.trace`` (TorchScript,
    CoreML, ...) ``is_tracing()``."""
    return (
        torch.onnx.is_in_onnx_export()
        or _is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


# --------------------------------------------------------------------------------------------
# The head's DFL module


@_homed
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
        if is_compiling():
            return self._integral_weight
        w = self.conv.weight
        # (inference tensors, e.g. loaded under torch.inference_mode, have no version counter)
        key = (w.device, w.dtype, w.data_ptr(), -1 if w.is_inference() else w._version)
        if w.device.type == "cpu" or key != self._checked:
            ok = tuple(w.shape) == (1, self.c1, 1, 1) and torch.equal(
                w.detach().reshape(-1), torch.arange(self.c1, dtype=w.dtype, device=w.device)
            )
            if not ok and (self._integral_weight or self._checked is None):
                warnings.warn(
                    "FusedDFL: conv.weight is not arange(reg_max); running the stock "
                    "softmax + convolution, which honours it",
                    stacklevel=3,
                )
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
    return {
        k: v.copy() if isinstance(v, (dict, set)) else v for k, v in module.__getstate__().items()
    }


# --------------------------------------------------------------------------------------------
# The loss


@_homed
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
        loss = functional.distribution_focal_loss(
            pred_dist, target.reshape(-1), reduction="none", check_values=False
        )
        return loss.view(target.shape).mean(-1, keepdim=True)


@_homed
class _FusedDetectionLoss:
    """Mixin over ``v8DetectionLoss`` (or a subclass that keeps its ``bbox_decode``)."""

    def bbox_decode(self, anchor_points: torch.Tensor, pred_dist: torch.Tensor) -> torch.Tensor:
        """pred_dist (B, A, 4 * reg_max) logits, anchor_points (A, 2) -> (B, A, 4) xyxy boxes in
        grid units, dtype of ``pred_dist`` (as Ultralytics' softmax-matmul under autocast)."""
        if self.use_dfl:
            b, a, c = pred_dist.shape
            pred_dist = functional.integral(pred_dist.view(b, a, 4, c // 4))
        return dist2bbox(pred_dist, anchor_points, xywh=False)


@_homed
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
