"""A reduced loss ('mean' / 'sum') whose gradient the forward kernel writes already scaled.

Where the gradient is fused into the forward (``FUSED_GRAD``: the CPU), the plain path is
kernel -> per-row loss -> ``loss * weight`` -> ``sum`` -> ``/ avg_factor``, and its backward
runs three autograd nodes and then scales the saved (N, C) gradient by the per-row factor that
comes back (a full read and write of it).  But that factor is known in the forward: for
``L = sum_i w_i l_i / d`` it is ``dL/dl_i = w_i / d``, times the incoming scalar gradient ``g``.
So here the kernel gets ``grad_scale = w / d`` and writes ``dl_i/dpred * w_i / d`` directly, and
the backward hands that buffer out unchanged when ``g == 1`` (``loss.backward()``, the usual
case), or scales it in place by the scalar ``g``.  Measured on the 2-core CPU (fresh inputs,
benchmarks/README.md "Fresh inputs"): the reduction's three ops and the backward (three small
nodes and the pass over the gradient) were ~200 of the ~570 us of the DFL step at 32000 x 17;
QFL 40000 x 80 went 2.30 -> 2.00 ms a step (in-process A/B).

The forward value is ``dot(l, w / d)``: one op where ``weight_reduce_loss`` runs three (a few
microseconds each count at 32000 rows), equal to it up to rounding; so is the gradient
(``w_i / d`` is applied once, in the kernel's opmath type).  A second backward through a
retained graph, or a backward that builds a graph (create_graph), recomputes the gradient with
the operator's ``*_backward`` kernel, which has its own derivative.  Only plain eager calls
take this path (see ``applies``).
"""

from __future__ import annotations

import torch

# op name -> its recomputing backward operator and the number of leading tensor arguments
RECOMPUTE = {
    "qfl": ("qfl_backward", 3),
    "qfl_dense": ("qfl_dense_backward", 2),
    "dfl": ("dfl_backward", 2),
}
_FLOAT_EPS = torch.finfo(torch.float32).eps


def grad_scale(
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    weight: torch.Tensor | None,
    reduction: str,
    avg_factor: float | torch.Tensor | None,
) -> torch.Tensor:
    """dL/dl_i of ``weight_reduce_loss`` for its 'mean' / 'sum' reductions: (N,) in ``dtype``
    (a stride-0 expansion when there is no weight).  One small op at most: this runs on every
    training step, where a few microseconds of Python count at 32000 rows."""
    if reduction == "sum":
        unit: float | torch.Tensor = 1.0
    elif avg_factor is None:
        unit = 1.0 / max(n, 1)
    elif isinstance(avg_factor, torch.Tensor):
        unit = 1.0 / (avg_factor.detach().to(device=device, dtype=dtype).reshape(()) + _FLOAT_EPS)
    else:
        unit = 1.0 / (avg_factor + _FLOAT_EPS)
    if weight is None:
        if not isinstance(unit, torch.Tensor):
            unit = torch.full((), unit, dtype=dtype, device=device)
        return unit.expand(n)
    return weight.detach().to(dtype) * unit


class ReducedLoss(torch.autograd.Function):
    """forward(pred, op, targets, params, weight, reduction, avg_factor) -> 0-d loss."""

    @staticmethod
    def forward(
        ctx,
        pred: torch.Tensor,
        op: str,
        targets: tuple,
        params: tuple,
        weight: torch.Tensor | None,
        reduction: str,
        avg_factor: float | torch.Tensor | None,
    ) -> torch.Tensor:
        ops = torch.ops.gfl_ops
        loss_dtype = torch.float32 if pred.dtype in (torch.float16, torch.bfloat16) else pred.dtype
        scale = grad_scale(pred.shape[0], loss_dtype, pred.device, weight, reduction, avg_factor)
        rows, grad = getattr(ops, op)(pred, *targets, *params, True, scale)
        ctx.op, ctx.params = op, params
        ctx.workspace = grad
        ctx.save_for_backward(pred, *targets, scale)
        return torch.dot(rows, scale) if rows.numel() else rows.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        nones = (None,) * 6
        workspace = ctx.workspace
        if workspace is not None and not torch.is_grad_enabled():
            ctx.workspace = None  # handed out once: a second backward recomputes
            if grad_out.item() != 1.0:
                rows = workspace.shape[0]
                torch.ops.gfl_ops.scale_rows_(workspace, grad_out.expand(rows))
            return (workspace, *nones)
        pred, *targets, scale = ctx.saved_tensors
        recompute, _ = RECOMPUTE[ctx.op]
        grad = getattr(torch.ops.gfl_ops, recompute)(scale * grad_out, pred, *targets, *ctx.params)
        return (grad, *nones)


def applies(
    pred: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
    avg_factor: object,
    targets: tuple,
) -> bool:
    """Whether a call may take this path: a reduced loss, the gradient needed, nothing but
    ``pred`` requiring grad."""
    if reduction == "none" or not (pred.requires_grad and torch.is_grad_enabled()):
        return False
    if weight is not None and weight.requires_grad:
        return False
    if isinstance(avg_factor, torch.Tensor) and avg_factor.requires_grad:
        return False
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in targets)
