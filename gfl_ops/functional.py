"""Public functional API, mmdetection-compatible (``mmdet.models.losses.gfocal_loss``).

Each function validates its arguments (metadata only, so it costs nothing and traces under
``torch.compile``), asks :mod:`gfl_ops._registry` for a backend, gets the *unreduced* loss from it,
then applies ``weight``, ``reduction`` and ``avg_factor`` exactly as mmdetection's
``weight_reduce_loss`` does.

Value checks that look at the data (QFL target scores and dense targets in [0, 1], DFL targets
in [0, n], no NaN, probabilities in [0, 1] with ``activated=True``) run on every device and
backend alike, so the same input gives the same error everywhere.  They cost one ``aminmax`` pass
over each checked tensor and, on a GPU, one host synchronisation per call; switch them off with
``gfl_ops.set_value_checks(False)``, ``GFL_OPS_CHECK_VALUES=0`` or ``check_values=False`` on a
call.  They cannot run inside ``torch.compile`` graphs, CUDA-graph capture or ``torch.vmap`` (no
host sync or value read there), where the kernels' documented behaviour applies, as it does with
the checks off: DFL targets are clamped to [0, n], activated QFL probabilities to [0, 1] (loss
and gradient of the bound), and a NaN target or probability gives a NaN loss for its row, on
every backend, the reference one included (:mod:`gfl_ops._reference_backend`).  QFL labels need
no check: as in mmdetection, any label outside [0, C) (-1, C, > C) marks a background anchor, on
every backend.

Gradients: ``pred`` gets its gradient from the fused kernels.  A target that requires grad (QFL
scores or dense target, DFL target) gets its correct gradient too: such a call is computed with
the reference formulas (:mod:`gfl_ops.reference`, in float32 for 16-bit ``pred``), since the
kernels treat targets as constants.  Double backward is exact on every backend
(:mod:`gfl_ops._second_order`).  Under ``torch.func`` transforms (grad, jacrev, jvp, vmap) and
forward-mode AD (``torch.autograd.forward_ad``) a call takes the reference formulas too: torch
refuses the fused operators' C++ autograd node there.

Dtypes: the per-row losses of fp16/bf16 predictions are computed and returned in float32 (so a
reduction over many anchors cannot overflow under AMP); gradients come back in the dtype of
``pred``.  ``integral`` returns the dtype of ``pred``.
"""

from __future__ import annotations

import os
from numbers import Number

import torch
import torch.autograd.forward_ad as _forward_ad

from gfl_ops import _registry, reference
from gfl_ops._extension import _C
from gfl_ops._torch_compat import is_compiling

__all__ = [
    "quality_focal_loss",
    "distribution_focal_loss",
    "integral",
    "weight_reduce_loss",
    "set_value_checks",
]

_REDUCTIONS = ("none", "mean", "sum")
_FLOAT_EPS = torch.finfo(torch.float32).eps
_value_checks = os.environ.get("GFL_OPS_CHECK_VALUES", "1").strip().lower() not in (
    "0",
    "false",
    "off",
    "no",
)


def set_value_checks(enabled: bool) -> None:
    """Switch the target value checks on (the default) or off, for every device and backend.

    On: one ``aminmax`` pass per checked tensor and, on a GPU, one host sync per call.  Off: the
    backends clamp DFL targets into [0, n] and activated probabilities into [0, 1], and give
    NaN rows for NaN values.
    """
    global _value_checks
    _value_checks = bool(enabled)


def _should_check_values(
    t: torch.Tensor, check_values: bool | None, transformed: bool, *checked: torch.Tensor | None
) -> bool:
    """Whether to read the values of ``checked`` (``t`` among them); ``transformed``: whether
    a torch.func transform or forward-mode AD wrapped the call's arguments
    (_under_autodiff_transform)."""
    if not (_value_checks if check_values is None else check_values):
        return False
    if is_compiling():  # no host sync inside a compiled graph
        return False
    if transformed and any(c is not None and _is_batched(c) for c in checked):
        return False  # torch.vmap cannot read values (.item()) of the tensors it batches
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _targets_need_grad(*targets: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in targets)


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _is_batched(t: torch.Tensor) -> bool:
    """Whether torch.vmap batches t at some level (under grad-of-vmap the outer wrapper is grad's;
    the batched one is inside it)."""
    functorch = torch._C._functorch
    while _is_functorch_wrapped(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _under_autodiff_transform(*tensors: torch.Tensor | None) -> bool:
    """Whether torch.func (grad, vjp, jvp, jacrev, vmap, ...) wrapped any argument, or forward-mode
    AD (``torch.autograd.forward_ad``) gave one a tangent.  The fused operators' autograd is a
    C++ node, which torch refuses under those transforms ("cannot use C++ torch::autograd::Function
    with functorch transforms", "jvp is not implemented for the c++ API of custom Function"), and
    vmap would run them one sample at a time; such a call takes the reference formulas, which
    torch transforms, batches and differentiates forward like any torch code.  (A plain loop:
    this runs on every call; the tangent lookup only inside a ``dual_level``.)  Not while dynamo
    traces: it handles torch.func itself, and traces the fused operators' fake kernels."""
    if is_compiling():
        return False
    for t in tensors:
        if t is not None and _is_functorch_wrapped(t):
            return True
    if _forward_ad._current_level >= 0:
        return any(
            t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors
        )
    return False


def _scores_at_labels(labels: torch.Tensor, scores: torch.Tensor, c: int) -> torch.Tensor:
    """The (N, C) dense target equal to ``(labels, scores)``: each anchor's score at its label, 0
    elsewhere (a label outside [0, C) matches no column: background), dtype of ``scores``.  QFL
    of it is the labels form's, term for term; no data-dependent shapes, so vmap batches it."""
    hit = labels[:, None] == torch.arange(c, device=labels.device)
    return torch.where(
        hit, scores[:, None], torch.zeros((), dtype=scores.dtype, device=scores.device)
    )


def _check_floating(name: str, t: object, ndim: int | None = None, shape_doc: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{shape_doc}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor{shape_doc}, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(
            f"{name} must have shape {shape_doc.strip() or f'{ndim}-D'}, got {tuple(t.shape)}"
        )


def _check_same_device(pred: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != pred.device:
            raise ValueError(
                f"{name} is on {t.device} but pred is on {pred.device}; "
                "they must be on the same device"
            )


def _check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, Number):
        raise TypeError(f"beta must be a non-negative real number, got {beta!r}")
    beta = float(beta)  # type: ignore[arg-type]
    if not (beta >= 0.0 and beta < float("inf")):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return beta


def _check_reduction(reduction: object, avg_factor: object) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if avg_factor is not None:
        if isinstance(avg_factor, torch.Tensor):
            if avg_factor.numel() != 1:
                raise ValueError(
                    "avg_factor must be a number or a one-element tensor, got shape "
                    f"{tuple(avg_factor.shape)}"
                )
        elif isinstance(avg_factor, bool) or not isinstance(avg_factor, Number):
            raise TypeError(f"avg_factor must be a number or a 0-d tensor, got {avg_factor!r}")
        if reduction == "sum":
            raise ValueError('avg_factor can not be used with reduction="sum"')


def _check_weight(weight: torch.Tensor | None, n: int, what: str) -> None:
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"weight must be a tensor of shape ({n},) (one value per {what}), got "
            f"{type(weight).__name__}"
        )
    if tuple(weight.shape) != (n,):
        raise ValueError(
            f"weight must have shape ({n},) (one value per {what}), got {tuple(weight.shape)}"
        )


def weight_reduce_loss(
    loss: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """mmdetection's ``weight_reduce_loss`` with one change: the mean of an empty loss is 0.

    Args:
        loss: (N,) unreduced loss.
        weight: optional (N,) element weights.
        reduction: 'none' | 'mean' | 'sum'.
        avg_factor: with 'mean', the loss is ``sum / (avg_factor + eps)`` (eps = float32 eps).
    """
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if avg_factor is None:
        # mean over N, without a NaN for N = 0 (N is static, so this is no sync)
        return loss.sum() / max(loss.numel(), 1)
    if isinstance(avg_factor, torch.Tensor):
        avg_factor = avg_factor.to(device=loss.device, dtype=loss.dtype).reshape(())
    return loss.sum() / (avg_factor + _FLOAT_EPS)


def _weighted_loss(
    impl,
    name: str,
    pred: torch.Tensor,
    targets: tuple,
    params: tuple,
    weight: torch.Tensor | None,
    reduction: str,
    avg_factor,
) -> torch.Tensor:
    """``weight_reduce_loss`` of the backend's per-row loss; a backend that fuses the gradient
    into its forward folds the reduction into it (``reduced_loss``) where it can."""
    reduced = getattr(impl, "reduced_loss", None)
    if reduced is not None:
        loss = reduced(name, pred, targets, params, weight, reduction, avg_factor)
        if loss is not None:
            return loss
    loss = getattr(impl, name)(pred, *targets, *params)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def _cpu_value_range(t: torch.Tensor) -> tuple[float, float]:
    if _C is not None:  # aminmax read straight into two floats, without Python in between
        return _C.value_range(t.detach())
    # without _C: torch before 2.2 has no CPU aminmax for float16 (-> float32 is exact)
    lo, hi = torch.aminmax(t.detach().float() if t.dtype == torch.float16 else t.detach())
    return lo.item(), hi.item()


def _value_ranges(*tensors: torch.Tensor) -> list[tuple[float, float]]:
    """(min, max) of each non-empty tensor, with a single host transfer for all of them (NaN
    propagates into both, so it fails any range comparison)."""
    if all(t.device.type == "cpu" for t in tensors):
        # no transfer to batch: two scalar reads each, without the stack/cat/tolist ops (a few
        # microseconds each, a tenth of the DFL step at 32000 rows on a CPU)
        return [_cpu_value_range(t) for t in tensors]
    stats = [torch.stack(torch.aminmax(t.detach())).float() for t in tensors]
    values = torch.cat(stats).tolist() if stats else []
    return [(values[2 * i], values[2 * i + 1]) for i in range(len(stats))]


def _validate_qfl_values(pred, scores, target, activated: bool) -> None:
    checked = [
        (name, t)
        for name, t in (("target scores", scores), ("target", target))
        if t is not None and t.numel()
    ]
    if activated and pred.numel():
        checked.append(("pred", pred))
    for (name, _), (lo, hi) in zip(checked, _value_ranges(*(t for _, t in checked))):
        if lo >= 0.0 and hi <= 1.0:
            continue
        if name == "pred":
            raise ValueError(
                "pred must hold probabilities in [0, 1] when activated=True, found "
                f"values outside it or NaN (min {lo}, max {hi})"
            )
        raise ValueError(
            f"{name} must lie in [0, 1] (IoU quality), found values outside it or "
            f"NaN (min {lo}, max {hi})"
        )


def quality_focal_loss(
    pred: torch.Tensor,
    target: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | torch.Tensor | None = None,
    beta: float = 2.0,
    activated: bool = False,
    backend: str | None = None,
    *,
    check_values: bool | None = None,
) -> torch.Tensor:
    """Quality Focal Loss (GFL paper, Eq. 5), summed over classes per anchor.

    Args:
        pred: (N, C) floating logits, or probabilities in [0, 1] with ``activated=True``.
        target: either ``(labels, scores)`` with labels (N,) integer (a class in [0, C); any
            other value, e.g. C or -1, is background) and scores (N,) floating IoU targets in
            [0, 1]; or a dense (N, C) floating soft target.
        weight: optional (N,) per-anchor weights.
        reduction: 'none' -> (N,); 'mean' | 'sum' -> 0-d.
        avg_factor: number or 0-d tensor dividing the sum when reduction='mean'.
        beta: modulating exponent, >= 0.
        activated: ``pred`` holds probabilities instead of logits.
        backend: 'cpu' | 'cuda' | 'triton' | 'reference' | 'auto' | None.
        check_values: check the target values (None: the global setting, on by default).

    Returns:
        The loss; float32 for fp16/bf16 ``pred``, else ``pred.dtype``.
    """
    _check_floating("pred", pred, 2, " (N, C)")
    n, num_classes = pred.shape
    beta = _check_beta(beta)
    _check_reduction(reduction, avg_factor)
    _check_weight(weight, n, "anchor")
    labels = scores = dense = None
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(
                "target must be (labels, scores) or a dense (N, C) tensor, got a "
                f"sequence of length {len(target)}"
            )
        labels, scores = target
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dtype.is_floating_point
            or labels.dtype.is_complex
            or labels.dtype == torch.bool
        ):
            raise TypeError(
                f"target labels must be an integer tensor of shape ({n},), got "
                f"{getattr(labels, 'dtype', type(labels).__name__)}"
            )
        if tuple(labels.shape) != (n,):
            raise ValueError(f"target labels must have shape ({n},), got {tuple(labels.shape)}")
        _check_floating("target scores", scores, None, f" ({n},)")
        if tuple(scores.shape) != (n,):
            raise ValueError(f"target scores must have shape ({n},), got {tuple(scores.shape)}")
    elif isinstance(target, torch.Tensor):
        dense = target
        _check_floating("target", dense, None, f" ({n}, {num_classes})")
        if dense.shape != pred.shape:
            raise ValueError(
                f"a dense target must have the shape of pred ({n}, {num_classes}), "
                f"got {tuple(dense.shape)}"
            )
    else:
        raise TypeError(
            f"target must be (labels, scores) or a dense (N, C) tensor, got {type(target).__name__}"
        )
    _check_same_device(pred, labels=labels, scores=scores, target=dense, weight=weight)
    transformed = _under_autodiff_transform(pred, labels, scores, dense, weight)
    if _should_check_values(pred, check_values, transformed, pred, scores, dense):
        _validate_qfl_values(pred, scores, dense, activated)

    impl = _registry.resolve(backend, pred.device, "qfl" if dense is None else "qfl_dense")
    if transformed or _targets_need_grad(scores, dense):
        impl = _registry.resolve("reference", pred.device, "qfl")
    name, targets = ("qfl", (labels, scores)) if dense is None else ("qfl_dense", (dense,))
    if transformed and dense is None:  # the reference labels form's nonzero: vmap cannot batch it
        name, targets = "qfl_dense", (_scores_at_labels(labels, scores, num_classes),)
    return _weighted_loss(
        impl, name, pred, targets, (beta, bool(activated)), weight, reduction, avg_factor
    )


def distribution_focal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | torch.Tensor | None = None,
    backend: str | None = None,
    *,
    check_values: bool | None = None,
) -> torch.Tensor:
    """Distribution Focal Loss (GFL paper, Eq. 6), per row.

    Args:
        pred: (M, n+1) floating logits over the bins 0..n (n >= 1).
        target: (M,) floating distances in [0, n]; a target equal to n is exact.
        weight: optional (M,) per-row weights.
        reduction, avg_factor, backend, check_values: as in :func:`quality_focal_loss`.

    Returns:
        The loss; float32 for fp16/bf16 ``pred``, else ``pred.dtype``.
    """
    _check_floating("pred", pred, 2, " (M, n+1)")
    m, n_bins = pred.shape
    if n_bins < 2:
        raise ValueError(f"pred must have shape (M, n+1) with at least 2 bins, got {n_bins}")
    _check_floating("target", target, None, f" ({m},)")
    if tuple(target.shape) != (m,):
        raise ValueError(f"target must have shape ({m},), got {tuple(target.shape)}")
    _check_reduction(reduction, avg_factor)
    _check_weight(weight, m, "row")
    _check_same_device(pred, target=target, weight=weight)
    transformed = _under_autodiff_transform(pred, target, weight)
    if _should_check_values(pred, check_values, transformed, target) and target.numel():
        ((lo, hi),) = _value_ranges(target)
        if not (lo >= 0.0 and hi <= n_bins - 1):
            raise ValueError(
                f"target must lie in [0, {n_bins - 1}] (n = bins - 1), found values "
                f"outside it or NaN (min {lo}, max {hi})"
            )
    impl = _registry.resolve(backend, pred.device, "dfl")
    if transformed or _targets_need_grad(target):
        impl = _registry.resolve("reference", pred.device, "dfl")
    return _weighted_loss(impl, "dfl", pred, (target,), (), weight, reduction, avg_factor)


def integral(pred: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Softmax-integral decoding: ``sum_j softmax(pred)_j * j`` over the last dimension.

    Args:
        pred: (..., n+1) floating logits (n >= 1).
        backend: as in :func:`quality_focal_loss`.

    Returns:
        (...) expected bin index in [0, n], dtype of ``pred``.

    During ONNX export (either ``torch.onnx.export`` path) it is the reference formula, which
    lowers to standard Softmax + MatMul: the one export fallback every module of this package
    relies on (``Integral``, the mmdetection and Ultralytics adapters).
    """
    _check_floating("pred", pred, None, " (..., n+1)")
    if pred.dim() < 1 or pred.size(-1) < 2:
        raise ValueError(
            f"pred must have shape (..., n+1) with at least 2 bins, got {tuple(pred.shape)}"
        )
    if torch.onnx.is_in_onnx_export():
        return reference.integral(pred)
    impl = _registry.resolve(backend, pred.device, "integral")
    if _under_autodiff_transform(pred):
        impl = _registry.resolve("reference", pred.device, "integral")
    if pred.dim() == 2:  # the common (M, n+1) case: no views, so no extra autograd nodes
        return impl.integral(pred)
    lead = pred.shape[:-1]
    return impl.integral(pred.reshape(-1, pred.size(-1))).reshape(lead)
