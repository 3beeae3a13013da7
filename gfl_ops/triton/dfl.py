"""Distribution Focal Loss in Triton: one loss per row of bin logits, and its gradient.

Math (docs/math.md, "Distribution Focal Loss"), row logits ``z`` over bins 0..n,
``S = softmax(z)``, target ``y``::

    y  <- clamp(y, 0, n)          (in the kernel; a NaN target: bins 0, 1 with NaN weights)
    l  = min(floor(y), n − 1),  r = l + 1,  w_l = r − y,  w_r = y − l
    L  = −(w_l·log S_l + w_r·log S_r)
    dL/dz_j = S_j − w_l·[j = l] − w_r·[j = r]

``y = n`` exactly uses bins (n−1, n) with weights (0, 1).  ``log S_j = (z_j − max z) − log Σ exp``
(stable for logits of any magnitude).

Kernel layout: BLOCK_M rows × BLOCK_B ≥ n+1 columns (next power of two, masked), so one load per
row block, a row max and a row sum (``tl.max`` / ``tl.sum``), and one value per row written.
"""

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
    tl_opmath,
)


def bins_config(num_rows: int, num_bins: int, dtype: torch.dtype) -> RowConfig:
    """Launch configuration of the DFL / integral kernels: the whole row in one power-of-two
    block (n+1 = 8 -> 8, 17 -> 32, 33 -> 64 columns) and as many rows as fill a tile."""
    return row_block(max(triton.next_power_of_2(num_bins), 2), num_rows, dtype)


@triton.jit
def _dfl_kernel(
    pred_ptr,
    target_ptr,
    grad_out_ptr,
    loss_ptr,
    grad_ptr,
    M,
    NB,
    stride_pm,
    stride_pb,
    stride_t,
    stride_go,
    CDT: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = row_ids(tl.program_id(0), BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_B)
    col_in = cols < NB
    mask = row_mask[:, None] & col_in[None, :]
    z = tl.load(
        pred_ptr + rows[:, None] * stride_pm + cols.to(tl.int64)[None, :] * stride_pb,
        mask=mask,
        other=0.0,
    ).to(CDT)
    # padding columns are -inf (weight 0 in the softmax); padding rows stay finite (zeros)
    z = tl.where(col_in[None, :], z, -float("inf"))
    zs = z - tl.max(z, axis=1)[:, None]
    e = tl.exp(zs)
    s = tl.sum(e, axis=1)

    y = tl.load(target_ptr + rows * stride_t, mask=row_mask, other=0.0).to(CDT)
    is_nan = y != y
    n = (NB - 1).to(CDT)
    y = tl.minimum(tl.maximum(tl.where(is_nan, 0.0, y), 0.0), n)
    left = tl.minimum(tl.floor(y), n - 1.0)
    # a NaN target: bins (0, 1) with NaN weights, as csrc/gfl_math.h's dfl_split, so the row's
    # loss and those two bins' gradients are NaN on every backend
    w_left = tl.where(is_nan, float("nan"), (left + 1.0) - y)
    w_right = tl.where(is_nan, float("nan"), y - left)
    li = left.to(tl.int32)
    at_left = cols[None, :] == li[:, None]
    at_right = cols[None, :] == (li + 1)[:, None]

    if WRITE_LOSS:
        log_s = tl.log(s)
        z_left = tl.sum(tl.where(at_left, zs, 0.0), axis=1)
        z_right = tl.sum(tl.where(at_right, zs, 0.0), axis=1)
        loss = -(w_left * (z_left - log_s) + w_right * (z_right - log_s))
        tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
    if WRITE_GRAD:
        inv_s = 1.0 / s
        g = e * inv_s[:, None]
        g = g - tl.where(at_left, w_left[:, None], 0.0) - tl.where(at_right, w_right[:, None], 0.0)
        if SCALE_GRAD:
            go = tl.load(grad_out_ptr + rows * stride_go, mask=row_mask, other=0.0).to(CDT)
            g = g * go[:, None]
        tl.store(
            grad_ptr + rows[:, None] * NB + cols[None, :],
            g.to(grad_ptr.dtype.element_ty),
            mask=mask,
        )


def _launch(pred, target, grad_out, write_loss, write_grad):
    m, nb = pred.shape
    loss = pred.new_empty(m, dtype=_common.opmath_dtype(pred.dtype)) if write_loss else None
    grad = pred.new_empty((m, nb)) if write_grad else None
    if m == 0:
        return loss, grad
    check_launchable(pred, "dfl")
    cfg = bins_config(m, nb, pred.dtype)
    dummy = pred
    with launch_guard(pred):
        _dfl_kernel[cfg.grid(m)](
            pred,
            target,
            grad_out if grad_out is not None else dummy,
            loss if loss is not None else dummy,
            grad if grad is not None else dummy,
            m,
            nb,
            pred.stride(0),
            pred.stride(1),
            target.stride(0),
            grad_out.stride(0) if grad_out is not None else 0,
            CDT=tl_opmath(pred.dtype),
            WRITE_LOSS=write_loss,
            WRITE_GRAD=write_grad,
            SCALE_GRAD=grad_out is not None,
            BLOCK_M=cfg.block_rows,
            BLOCK_B=cfg.block_cols,
            num_warps=cfg.num_warps,
        )
    return loss, grad


@torch.library.custom_op("gfl_ops::triton_dfl", mutates_args=())
def dfl(
    pred: torch.Tensor, target: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (M,), dloss/dpred (M, n+1) in pred's dtype) from (M, n+1) ``pred`` logits and (M,)
    float ``target``, in one pass; without ``with_grad`` the second output is an empty (0,)."""
    loss, grad = _launch(pred, target, None, True, with_grad)
    return loss, grad if grad is not None else pred.new_empty(0)


@torch.library.custom_op("gfl_ops::triton_dfl_backward", mutates_args=())
def dfl_backward(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(M, n+1) ``grad_loss[:, None] * dloss/dpred``, recomputed, in pred's dtype."""
    return _launch(pred, target, grad_loss, False, True)[1]


@dfl.register_fake
def _(pred, target, with_grad):
    return _common.loss_and_grad_like(pred, with_grad, _common.opmath_dtype(pred.dtype))


@dfl_backward.register_fake
def _(grad_loss, pred, target):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


register_loss_autograd("dfl", dfl, dfl_backward, n_tensors=2)
