"""Softmax-integral decoding in Triton: ``ŷ = Σ_j softmax(z)_j · j`` per row, and its gradient.

``dŷ/dz_j = S_j · (j − ŷ)``, with ``j − ŷ`` formed about an integer pivot near ŷ (see the
kernel) so that it keeps its digits when ŷ is close to a large bin index.  Same layout as the DFL
kernel (whole row in one masked power-of-two block, see :func:`gfl_ops.triton.dfl.bins_config`);
the value is computed in the opmath dtype and returned in ``pred``'s dtype, like the reference.
"""

import torch
import triton
import triton.language as tl

from gfl_ops._second_order import register_gradient_autograd
from gfl_ops.triton import _common
from gfl_ops.triton._common import check_launchable, launch_guard, row_ids, tl_opmath
from gfl_ops.triton.dfl import bins_config


@triton.jit
def _integral_kernel(
    pred_ptr,
    grad_out_ptr,
    out_ptr,
    grad_ptr,
    M,
    NB,
    stride_pm,
    stride_pb,
    stride_go,
    CDT: tl.constexpr,
    WRITE_OUT: tl.constexpr,
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
    z = tl.where(col_in[None, :], z, -float("inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    inv_s = 1.0 / tl.sum(e, axis=1)
    j = cols.to(CDT)
    # ŷ about an integer pivot r near it: ŷ = r + Σ S_k (k − r).  The terms of the second sum are
    # small where the probability mass is, so j − ŷ = (j − r) − δ keeps its digits when ŷ is
    # large and close to j (plain Σ S_k k loses ~log2(n) bits there, 7e-5 relative seen at n = 32).
    pivot = tl.floor(tl.sum(e * j[None, :], axis=1) * inv_s + 0.5)
    offset = j[None, :] - pivot[:, None]  # exact small integers
    delta = tl.sum(e * offset, axis=1) * inv_s
    if WRITE_OUT:
        tl.store(out_ptr + rows, (pivot + delta).to(out_ptr.dtype.element_ty), mask=row_mask)
    if WRITE_GRAD:
        g = e * inv_s[:, None] * (offset - delta[:, None])
        if SCALE_GRAD:
            go = tl.load(grad_out_ptr + rows * stride_go, mask=row_mask, other=0.0).to(CDT)
            g = g * go[:, None]
        tl.store(
            grad_ptr + rows[:, None] * NB + cols[None, :],
            g.to(grad_ptr.dtype.element_ty),
            mask=mask,
        )


def _launch(pred, grad_out, write_out, write_grad):
    m, nb = pred.shape
    out = pred.new_empty(m) if write_out else None
    grad = pred.new_empty((m, nb)) if write_grad else None
    if m == 0:
        return out, grad
    check_launchable(pred, "integral")
    cfg = bins_config(m, nb, pred.dtype)
    dummy = pred
    with launch_guard(pred):
        _integral_kernel[cfg.grid(m)](
            pred,
            grad_out if grad_out is not None else dummy,
            out if out is not None else dummy,
            grad if grad is not None else dummy,
            m,
            nb,
            pred.stride(0),
            pred.stride(1),
            grad_out.stride(0) if grad_out is not None else 0,
            CDT=tl_opmath(pred.dtype),
            WRITE_OUT=write_out,
            WRITE_GRAD=write_grad,
            SCALE_GRAD=grad_out is not None,
            BLOCK_M=cfg.block_rows,
            BLOCK_B=cfg.block_cols,
            num_warps=cfg.num_warps,
        )
    return out, grad


@torch.library.custom_op("gfl_ops::triton_integral_fwd", mutates_args=())
def integral_fwd(pred: torch.Tensor) -> torch.Tensor:
    """(M,) expected bin index of (M, n+1) ``pred`` logits, in pred's dtype."""
    return _launch(pred, None, True, False)[0]


@torch.library.custom_op("gfl_ops::triton_integral_fwd_fused", mutates_args=())
def integral_fwd_fused(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value (M,), dvalue/dpred (M, n+1)), both in pred's dtype, in one pass."""
    return _launch(pred, None, True, True)


@torch.library.custom_op("gfl_ops::triton_integral_bwd", mutates_args=())
def integral_bwd(grad_out: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(M, n+1) ``grad_out[:, None] * dvalue/dpred``, recomputed, in pred's dtype."""
    return _launch(pred, grad_out, False, True)[1]


@integral_fwd.register_fake
def _(pred):
    return pred.new_empty(pred.shape[0])


@integral_fwd_fused.register_fake
def _(pred):
    return pred.new_empty(pred.shape[0]), torch.empty_like(
        pred, memory_format=torch.contiguous_format
    )


@integral_bwd.register_fake
def _(grad_out, pred):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_recompute(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_out):
    (pred,) = ctx.saved_tensors
    return integral_bwd(grad_out, pred) if ctx.needs_input_grad[0] else None


def _setup_fused(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    # pred too: a backward that builds a graph (create_graph) recomputes
    ctx.save_for_backward(output[1], inputs[0])


def _backward_fused(ctx, grad_out, _grad_of_grad):
    saved, pred = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None
    if torch.is_grad_enabled():  # create_graph: the saved gradient has no derivative of its own
        return integral_bwd(grad_out, pred)
    return _common.scale_rows(saved, grad_out)


integral_fwd.register_autograd(_backward, setup_context=_setup_recompute)
integral_fwd_fused.register_autograd(_backward_fused, setup_context=_setup_fused)
register_gradient_autograd(integral_bwd, "integral")
