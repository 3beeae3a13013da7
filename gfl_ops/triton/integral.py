"""Softmax-integral decoding in Triton: ``ŷ = Σ_j softmax(z)_j · j`` per row, and its gradient.

``dŷ/dz_j = S_j · (j − ŷ)``, in the stable form of docs/math.md ("The integral") that the CPU
and CUDA kernels use too: about the row's argmax bin ``p`` (the pivot; ties to the lowest bin),
``ŷ − p = Σ_j e_j (j − p) / Z`` over exact small integers ``j − p`` and
``dŷ/dz_j · g = e_j · fma(c, j − p, −c·(ŷ − p))`` with ``c = g / Z`` (``g`` the row's
``grad_output``, 1 for the unscaled fused gradient), so ``j − ŷ`` does not cancel where the mass
sits on one bin.  Same layout as the DFL kernel (whole row in one masked power-of-two block, see
:func:`gfl_ops.triton.dfl.bins_config`); the value is computed in the opmath dtype and returned in
``pred``'s dtype, like the reference.
"""

import torch
import triton
import triton.language as tl

from gfl_ops.triton import _common
from gfl_ops.triton._common import (
    check_launchable,
    launch_guard,
    register_loss_autograd,
    row_ids,
    tl_opmath,
)
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
    zmax = tl.max(z, axis=1)
    j = cols.to(CDT)
    # The pivot p: the row's argmax bin, the lowest where several hold the max (tl.argmax's
    # tie-break, written as a compare and an integer min: the interpreter's tl.argmax raises on
    # an all-NaN row, and the same min over the float bins left ptxas an 8-byte stack frame in
    # the fp64 gradient for sm_80, tests/test_triton_compiled.py).  A row with no bin equal to
    # its max (a NaN max) gets BLOCK_B, a finite pivot for a row whose outputs are all NaN
    # anyway.  As in the CPU and CUDA kernels (docs/math.md, "The integral"):
    # ŷ − p = Σ_k e_k (k − p) / Z over exact small integers k − p, so j − ŷ = (j − p) − (ŷ − p)
    # keeps its digits where the mass sits on one bin.
    pivot = tl.min(tl.where(z == zmax[:, None], cols[None, :], BLOCK_B), axis=1).to(CDT)
    e = tl.exp(z - zmax[:, None])
    inv_s = 1.0 / tl.sum(e, axis=1)
    offset = j[None, :] - pivot[:, None]  # j − p, exact
    delta = tl.sum(e * offset, axis=1) * inv_s  # ŷ − p
    if WRITE_OUT:
        tl.store(out_ptr + rows, (pivot + delta).to(out_ptr.dtype.element_ty), mask=row_mask)
    if WRITE_GRAD:
        # g · dŷ/dz_j = e_j · fma(c, j − p, −c·(ŷ − p)), c = g / Z: one rounding for the bracket,
        # exactly −c·(ŷ − p) at j = p (gfl_math.h's integral_grad_scaled)
        c = inv_s
        if SCALE_GRAD:
            go = tl.load(grad_out_ptr + rows * stride_go, mask=row_mask, other=0.0).to(CDT)
            c = c * go
        g = e * tl.fma(c[:, None], offset, -(c * delta)[:, None])
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


@torch.library.custom_op("gfl_ops::triton_integral", mutates_args=())
def integral(pred: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected bin index (M,), dvalue/dpred (M, n+1)) of (M, n+1) ``pred`` logits, both in
    pred's dtype, in one pass; without ``with_grad`` the second output is an empty (0,)."""
    out, grad = _launch(pred, None, True, with_grad)
    return out, grad if grad is not None else pred.new_empty(0)


@torch.library.custom_op("gfl_ops::triton_integral_backward", mutates_args=())
def integral_backward(grad_out: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(M, n+1) ``grad_out[:, None] * dvalue/dpred``, recomputed, in pred's dtype."""
    return _launch(pred, grad_out, False, True)[1]


@integral.register_fake
def _(pred, with_grad):
    return _common.loss_and_grad_like(pred, with_grad, pred.dtype)


@integral_backward.register_fake
def _(grad_out, pred):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


register_loss_autograd("integral", integral, integral_backward, n_tensors=1)
