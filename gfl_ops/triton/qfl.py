"""Quality Focal Loss in Triton: per-anchor loss summed over classes, and its gradient.

Math (docs/math.md, "Quality Focal Loss"), per element with logit ``x``, target ``y`` and
``σ = sigmoid(x)``::

    L      = |y − σ|^β · BCE(x, y),   BCE = max(x, 0) − x·y + log1p(exp(−|x|))
    dL/dx  = β·|y−σ|^(β−1)·sign(σ−y)·σ(1−σ)·BCE + |y−σ|^β·(σ − y)

with the subgradient 0 for the first term at ``σ = y``.  With ``activated=True`` the input is the
probability ``p`` itself, ``BCE = −(y·max(log p, −100) + (1−y)·max(log1p(−p), −100))`` (torch's
clamp) and ``dBCE/dp = (p − y) / max(p(1−p), 1e-12)`` (torch's ``binary_cross_entropy``
backward).  Labels outside [0, C) mark background anchors (target 0 on every class).

Numerics: ``σ``, ``σ(1−σ)`` and ``σ − y`` are formed from ``e = exp(−|x|)`` so that neither side
of the sigmoid loses digits (``σ − y`` is ``(a − y − y·e)/(1+e)`` with ``a = 1`` for ``x ≥ 0``, else
``e``: exact ``a − y`` and one FMA where ``σ`` is close to ``y``);
``log1p(e)`` is ``log(u) + (e − (u − 1))/u`` with ``u = 1 + e`` (exact compensation for the
rounding of ``u``; ``1/u`` is already needed for ``σ``, so no extra division).  ``|d|^β`` is
specialised at compile time for β ∈ {0, 1, 2}; otherwise ``|d|^(β−1) = exp2((β−1)·log2|d|)``
(0 at ``d = 0``, the subgradient) and ``|d|^β = |d|^(β−1)·|d|``.

Kernel layout: one program owns BLOCK_N rows and walks the classes in BLOCK_C-wide steps,
accumulating the row sum in the opmath dtype and writing one value per row (no atomics).  The
same kernel writes the loss (forward), the gradient scaled by ``grad_output`` (backward,
recomputed), or both (fused mode): the flags are ``tl.constexpr`` so dead outputs cost nothing.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from gfl_ops.triton import _common
from gfl_ops.triton._common import (
    RowConfig,
    check_launchable,
    launch_guard,
    register_loss_autograd,
    row_block,
    row_ids,
    split_float,
    tl_opmath,
)

# |d|^β specialisations (tl.constexpr BETA_MODE)
BETA_ZERO, BETA_ONE, BETA_TWO, BETA_GENERAL = 0, 1, 2, 3


def beta_mode(beta: float) -> int:
    """Compile-time specialisation of ``|d|^β``: β = 0, 1, 2 avoid the exp2/log2 pair."""
    return {0.0: BETA_ZERO, 1.0: BETA_ONE, 2.0: BETA_TWO}.get(float(beta), BETA_GENERAL)


def qfl_block_c(num_classes: int) -> int:
    """Columns per loop step for ``num_classes`` classes.

    C <= 32: one step of next_power_of_2(C) columns (one pass, some lanes masked).  Larger C:
    the widest step in 256..16 whose padding (ceil(C/step)·step − C) stays within 12.5 % of C,
    else the step with the least padding, so large or awkward C (80, 365, 1203) loop over a few
    nearly full steps instead of one mostly masked power-of-two block (C = 1203 -> 5 × 256
    columns; 80 -> 5 × 16; 365 -> 3 × 128).
    """
    if num_classes <= 32:
        return triton.next_power_of_2(max(num_classes, 1))
    candidates = (256, 128, 64, 32, 16)
    for step in candidates:
        if triton.cdiv(num_classes, step) * step * 8 <= num_classes * 9:
            return step
    return min(candidates, key=lambda s: (triton.cdiv(num_classes, s) * s, -s))


def qfl_config(num_rows: int, num_classes: int, dtype: torch.dtype) -> RowConfig:
    """Launch configuration (rows per program, columns per step, warps) of the QFL kernel."""
    return row_block(qfl_block_c(num_classes), num_rows, dtype)


# ATen's EPSILON in binary_cross_entropy's gradient is the *float* 1e-12 in every dtype
# (9.99999996e-13; csrc/gfl_math.h uses 1e-12f to match).  Spelled out: a bare 1e-12 literal
# meets float64 math as that float under Triton 3.8 but as the exact double under 3.9, which
# moved float64 gradients by 4e-9 relative from torch's where p (1 - p) < 1e-12.
BCE_EPS = tl.constexpr(float(np.float32(1e-12)))


@triton.jit
def _qfl_terms(x, y, beta, BETA_MODE: tl.constexpr, ACTIVATED: tl.constexpr):
    """Element loss and d loss / d pred, in the dtype of ``x`` (the opmath dtype)."""
    if ACTIVATED:
        # outside [0, 1] (value checks off): the nearer of 0 and 1, loss and gradient alike, as
        # csrc/gfl_math.h's clamp_prob; NaN stays NaN
        p = tl.where(x > 1.0, 1.0, tl.where(x < 0.0, 0.0, x))
        d = p - y
        # log1p(-p), compensated as in the logits branch; u = 1 - p is exact for p >= 0.5
        u = 1.0 - p
        safe_u = tl.where(u > 0.0, u, 1.0)
        log1m_p = tl.where(u > 0.0, tl.log(safe_u) + (-p - (u - 1.0)) / safe_u, -float("inf"))
        log_p = tl.maximum(tl.log(p), -100.0, propagate_nan=tl.PropagateNan.ALL)
        log1m_p = tl.maximum(log1m_p, -100.0, propagate_nan=tl.PropagateNan.ALL)
        bce = -(y * log_p + (1.0 - y) * log1m_p)
        dbce = d / tl.maximum(p * (1.0 - p), tl.cast(BCE_EPS, x.dtype))
        dsig = 1.0
    else:
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        inv = 1.0 / u
        e_inv = e * inv  # min(σ, 1 − σ)
        log1p_e = tl.log(u) + (e - (u - 1.0)) * inv
        bce = tl.where(x > 0.0, x, 0.0) - x * y + log1p_e
        # σ − y = (a − y − y·e)/(1 + e), a = 1 (x ≥ 0) or e: a − y is exact where σ ≈ y and the
        # FMA rounds once, so d keeps its relative accuracy (as gfl_math.h's qfl_logit)
        d = tl.fma(-y, e, tl.where(x >= 0.0, 1.0, e) - y) * inv
        dbce = d
        dsig = e_inv * inv  # σ(1 − σ)
    if BETA_MODE == 0:
        loss = bce
        grad = dbce
    else:
        ad = tl.abs(d)
        if BETA_MODE == 1:
            mod = ad
            coef = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        elif BETA_MODE == 2:
            mod = ad * ad
            coef = 2.0 * d
        else:
            pos = ad > 0.0
            # |d|^(β−1), 0 at d = 0: the subgradient of the first term there
            pow_bm1 = tl.where(pos, tl.exp2((beta - 1.0) * tl.log2(tl.where(pos, ad, 1.0))), 0.0)
            mod = pow_bm1 * ad
            coef = tl.where(d < 0.0, -beta, beta) * pow_bm1
        loss = mod * bce
        grad = coef * dsig * bce + mod * dbce
    return loss, grad


@triton.jit
def _qfl_kernel(
    pred_ptr,
    labels_ptr,
    scores_ptr,
    target_ptr,
    grad_out_ptr,
    loss_ptr,
    grad_ptr,
    N,
    C,
    stride_pn,
    stride_pc,
    stride_lab,
    stride_sc,
    stride_tn,
    stride_tc,
    stride_go,
    beta_hi,
    beta_lo,
    DENSE: tl.constexpr,
    ACTIVATED: tl.constexpr,
    BETA_MODE: tl.constexpr,
    CDT: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = row_ids(tl.program_id(0), BLOCK_N)
    row_mask = rows < N
    # beta rebuilt from two float32 halves: exact enough for float64 math
    beta = tl.cast(beta_hi, CDT) + tl.cast(beta_lo, CDT)
    if not DENSE:
        labels = tl.load(labels_ptr + rows * stride_lab, mask=row_mask, other=0)
        scores = tl.load(scores_ptr + rows * stride_sc, mask=row_mask, other=0.0).to(CDT)
    if SCALE_GRAD:
        go = tl.load(grad_out_ptr + rows * stride_go, mask=row_mask, other=0.0).to(CDT)
    acc = tl.zeros([BLOCK_N], dtype=CDT)
    pred_rows = pred_ptr + rows[:, None] * stride_pn
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cols64 = cols.to(tl.int64)
        mask = row_mask[:, None] & (cols < C)[None, :]
        x = tl.load(pred_rows + cols64[None, :] * stride_pc, mask=mask, other=0.0).to(CDT)
        if DENSE:
            y = tl.load(
                target_ptr + rows[:, None] * stride_tn + cols64[None, :] * stride_tc,
                mask=mask,
                other=0.0,
            ).to(CDT)
        else:
            # labels outside [0, C) never match a column: background
            y = tl.where(cols[None, :] == labels[:, None], scores[:, None], 0.0)
        loss, grad = _qfl_terms(x, y, beta, BETA_MODE, ACTIVATED)
        if WRITE_LOSS:
            acc += tl.sum(tl.where(mask, loss, 0.0), axis=1)
        if WRITE_GRAD:
            if SCALE_GRAD:
                grad = grad * go[:, None]
            tl.store(
                grad_ptr + rows[:, None] * C + cols64[None, :],
                grad.to(grad_ptr.dtype.element_ty),
                mask=mask,
            )
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, acc.to(loss_ptr.dtype.element_ty), mask=row_mask)


def _launch(pred, labels, scores, target, grad_out, beta, activated, write_loss, write_grad):
    """Run the QFL kernel; returns (loss or None, grad or None).  ``target`` None = labels."""
    n, c = pred.shape
    loss = pred.new_empty(n, dtype=_common.opmath_dtype(pred.dtype)) if write_loss else None
    grad = pred.new_empty((n, c)) if write_grad else None
    if n == 0 or c == 0:  # nothing to launch; an empty row sums to 0
        if loss is not None:
            loss.zero_()
        return loss, grad
    check_launchable(pred, "qfl")
    dense = target is not None
    cfg = qfl_config(n, c, pred.dtype)
    beta_hi, beta_lo = split_float(beta)
    dummy = pred  # pointer for arguments a constexpr branch never reads
    with launch_guard(pred):
        _qfl_kernel[cfg.grid(n)](
            pred,
            labels if not dense else dummy,
            scores if not dense else dummy,
            target if dense else dummy,
            grad_out if grad_out is not None else dummy,
            loss if loss is not None else dummy,
            grad if grad is not None else dummy,
            n,
            c,
            pred.stride(0),
            pred.stride(1),
            0 if dense else labels.stride(0),
            0 if dense else scores.stride(0),
            target.stride(0) if dense else 0,
            target.stride(1) if dense else 0,
            grad_out.stride(0) if grad_out is not None else 0,
            beta_hi,
            beta_lo,
            DENSE=dense,
            ACTIVATED=bool(activated),
            BETA_MODE=beta_mode(beta),
            CDT=tl_opmath(pred.dtype),
            WRITE_LOSS=write_loss,
            WRITE_GRAD=write_grad,
            SCALE_GRAD=grad_out is not None,
            BLOCK_N=cfg.block_rows,
            BLOCK_C=cfg.block_cols,
            num_warps=cfg.num_warps,
        )
    return loss, grad


# --------------------------------------------------------------------------------------------
# torch.library custom ops.  (labels, scores) and dense targets are separate ops so each schema
# holds only real tensors.  Gradients flow to pred only: targets are constants, as in mmdetection
# (the IoU scores come from detached boxes).
# --------------------------------------------------------------------------------------------


def _loss_like(pred: torch.Tensor) -> torch.Tensor:
    return pred.new_empty(pred.shape[0], dtype=_common.opmath_dtype(pred.dtype))


@torch.library.custom_op("gfl_ops::triton_qfl", mutates_args=())
def qfl(
    pred: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    beta: float,
    activated: bool,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), dloss/dpred (N, C) in pred's dtype) from (N, C) ``pred``, (N,) integer
    ``labels`` and (N,) float ``scores``, in one pass over ``pred``; without ``with_grad`` the
    second output is an empty (0,)."""
    loss, grad = _launch(pred, labels, scores, None, None, beta, activated, True, with_grad)
    return loss, grad if grad is not None else pred.new_empty(0)


@torch.library.custom_op("gfl_ops::triton_qfl_backward", mutates_args=())
def qfl_backward(
    grad_loss: torch.Tensor,
    pred: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    beta: float,
    activated: bool,
) -> torch.Tensor:
    """(N, C) ``grad_loss[:, None] * dloss/dpred``, recomputed, in pred's dtype."""
    return _launch(pred, labels, scores, None, grad_loss, beta, activated, False, True)[1]


@torch.library.custom_op("gfl_ops::triton_qfl_dense", mutates_args=())
def qfl_dense(
    pred: torch.Tensor, target: torch.Tensor, beta: float, activated: bool, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), dloss/dpred (N, C)) for a dense (N, C) float ``target``, in one pass; without
    ``with_grad`` the second output is an empty (0,)."""
    loss, grad = _launch(pred, None, None, target, None, beta, activated, True, with_grad)
    return loss, grad if grad is not None else pred.new_empty(0)


@torch.library.custom_op("gfl_ops::triton_qfl_dense_backward", mutates_args=())
def qfl_dense_backward(
    grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, beta: float, activated: bool
) -> torch.Tensor:
    """(N, C) ``grad_loss[:, None] * dloss/dpred`` for a dense target, recomputed."""
    return _launch(pred, None, None, target, grad_loss, beta, activated, False, True)[1]


@qfl.register_fake
def _(pred, labels, scores, beta, activated, with_grad):
    return _common.loss_and_grad_like(pred, with_grad, _common.opmath_dtype(pred.dtype))


@qfl_backward.register_fake
def _(grad_loss, pred, labels, scores, beta, activated):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


@qfl_dense.register_fake
def _(pred, target, beta, activated, with_grad):
    return _common.loss_and_grad_like(pred, with_grad, _common.opmath_dtype(pred.dtype))


@qfl_dense_backward.register_fake
def _(grad_loss, pred, target, beta, activated):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


register_loss_autograd("qfl", qfl, qfl_backward, n_tensors=3)
register_loss_autograd("qfl_dense", qfl_dense, qfl_dense_backward, n_tensors=2)
