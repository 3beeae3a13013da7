"""Second derivatives: the autograd formula of every backend's gradient operator.

Each backend computes dL/dpred with a kernel (``gfl_ops::*_backward`` for the C++/CUDA backends,
``gfl_ops::triton_*_backward`` for Triton).  Differentiating that gradient again (double backward:
``autograd.grad(..., create_graph=True)`` then a second ``backward``, as in gradient penalties or
meta-learning) needs the derivative of the kernel's output with respect to its inputs.  It is
rare and never on a training step's hot path, so it is taken from the float64-tested reference
formulas (:mod:`gfl_ops.reference`) with autograd, not from a second set of kernels:

    grad_pred = J(pred)^T g                    (the gradient operator, g = grad_loss, (N,))
    d<grad_pred, v>/dpred = H(pred) . v        (Hessian-vector product, row by row)
    d<grad_pred, v>/dg    = J(pred) v          (one value per row)

Both come out of one ``autograd.grad`` of the reference gradient, built with ``create_graph``.
Third and higher derivatives raise: the reference gradient is rebuilt from detached inputs, so a
further derivative would silently miss terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gfl_ops import _torch_compat, reference
from gfl_ops._reference_backend import BACKEND as REFERENCE

__all__ = ["gradient_vjp", "register_gradient_autograd", "LOSS_FORMULAS"]


def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# kind -> per-row value of the forward, f(pred, *rest) with rest = the operator's other arguments:
# the reference backend's, which gives values that only the value checks reject (a DFL target
# outside [0, n], an activated probability outside [0, 1]) the kernels' meaning too
LOSS_FORMULAS: dict[str, Callable[..., torch.Tensor]] = {
    "qfl": REFERENCE.qfl,
    "qfl_dense": REFERENCE.qfl_dense,
    "dfl": REFERENCE.dfl,
    "integral": lambda pred: reference.integral(pred),
}


def gradient_vjp(
    kind: str,
    grad_loss: torch.Tensor,
    pred: torch.Tensor,
    rest: tuple,
    grad_grad: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """Vector-Jacobian product of a gradient operator ``(grad_loss, pred, *rest) -> grad_pred``.

    Args:
        kind: 'qfl' | 'qfl_dense' | 'dfl' | 'integral'.
        grad_loss: (N,) the incoming gradient the operator scaled by.
        pred: (N, K) the forward's input, any floating dtype.
        rest: the operator's remaining arguments (targets, beta, activated), unchanged.
        grad_grad: (N, K) the gradient arriving at ``grad_pred``, or None.

    Returns:
        ``(d grad_loss, d pred)`` in the dtypes of ``grad_loss`` and ``pred``, then one ``None``
        per entry of ``rest`` (targets get no gradient through this path).
    """
    none_rest = (None,) * len(rest)
    if grad_grad is None:
        return (None, None, *none_rest)
    if torch.is_grad_enabled():
        raise RuntimeError(
            "gfl_ops: third and higher derivatives are not supported; the second derivative "
            "(double backward) is. Use gfl_ops.reference's formulas for higher orders."
        )
    with torch.enable_grad():
        p = pred.detach().requires_grad_(True)
        g = grad_loss.detach().requires_grad_(True)
        value = LOSS_FORMULAS[kind](_opmath(p), *rest)
        (grad_pred,) = torch.autograd.grad(value, p, g.to(value.dtype), create_graph=True)
        d_g, d_p = torch.autograd.grad(
            grad_pred, (g, p), grad_grad.to(grad_pred.dtype), allow_unused=True
        )
    if d_g is None:
        d_g = torch.zeros_like(grad_loss)
    if d_p is None:
        d_p = torch.zeros_like(pred)
    return (d_g.to(grad_loss.dtype), d_p.to(pred.dtype), *none_rest)


def register_gradient_autograd(op: object, kind: str) -> None:
    """Register :func:`gradient_vjp` as the autograd of a gradient operator.

    Args:
        op: the operator (a qualified name such as ``"gfl_ops::dfl_backward"`` or a
            ``torch.library.custom_op``) with signature ``(grad_loss, pred, *rest) -> grad_pred``.
        kind: 'qfl' | 'qfl_dense' | 'dfl' | 'integral'.
    """

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.constants = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))

    def backward(ctx, grad_grad):
        args = list(ctx.constants)
        for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = t
        grad_loss, pred, *rest = args
        return gradient_vjp(kind, grad_loss, pred, tuple(rest), grad_grad)

    _torch_compat.register_autograd(op, backward, setup_context=setup_context)
