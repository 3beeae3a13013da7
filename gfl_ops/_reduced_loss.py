"""A reduced loss ('mean' / 'sum') whose gradient the forward kernel writes already scaled.

Where the gradient is fused into the forward (``FUSED_GRAD``: the CPU), the plain path is
kernel -> per-row loss -> ``loss * weight`` -> ``sum`` -> ``/ avg_factor``, and its backward
runs three autograd nodes and then scales the saved (N, C) gradient by the per-row factor that
comes back (a full read and write of it).  But that factor is known in the forward: for
``L = sum_i w_i l_i / d`` it is ``dL/dl_i = w_i / d``, times the incoming scalar gradient ``g``.
So here the kernel gets ``grad_scale = w / d`` and writes ``dl_i/dpred * w_i / d`` directly, and
the backward hands that buffer out unchanged when ``g == 1`` (``loss.backward()``, the usual
case), or scales it in place by the scalar ``g``.

The node is C++ (csrc/autograd.cpp, ``ReducedLossFunction``; one call from here): it
forms ``w * unit`` with a plain loop, calls the kernel, and returns ``dot(l, w * unit)``.
Measured on the 2-core CPU (fresh inputs, benchmarks/README.md "Fresh inputs"): the reduction's
three ops and the backward were ~200 of the ~570 us of the DFL step at 32000 x 17, and QFL
40000 x 80 went 2.30 -> 2.00 ms a step with the first, Python, form of this path; moving the
node, the weight product and the value check's reads to C++ took the DFL step from ~550 to
~450 us (in-process A/B against the previous build: benchmarks/README.md, "Fresh inputs").

The forward value is ``dot(l, w * unit)``: one op where ``weight_reduce_loss`` runs three,
equal to it up to rounding; so is the gradient (``w_i * unit`` is applied once, in the kernel's
opmath type).  A second backward through a retained graph, or a backward that builds a graph
(create_graph), recomputes the gradient with the operator's ``*_backward`` kernel, which has
its own derivative.  Only plain eager calls take this path (see ``applies``).
"""

from __future__ import annotations

import torch

from gfl_ops._extension import _C

_FLOAT_EPS = torch.finfo(torch.float32).eps


def reduction_unit(
    n: int,
    dtype: torch.dtype,
    reduction: str,
    avg_factor: float | torch.Tensor | None,
) -> float:
    """The factor ``dL/dl_i / weight_i`` of ``weight_reduce_loss``'s 'mean' / 'sum': 1 for
    'sum', ``1 / n`` for a plain mean, ``1 / (avg_factor + eps)`` with an avg_factor (a tensor
    one computed in ``dtype``, as the per-row path divides by it, and read back once: this path
    is for CPU tensors)."""
    if reduction == "sum":
        return 1.0
    if avg_factor is None:
        return 1.0 / max(n, 1)
    if isinstance(avg_factor, torch.Tensor):
        avg = avg_factor.detach().to(dtype=dtype).reshape(())
        return (1.0 / (avg + _FLOAT_EPS)).item()
    return 1.0 / (avg_factor + _FLOAT_EPS)


# op name -> the ``kind`` argument of ``_C.reduced_loss_eager``
_KINDS = {"qfl": 0, "qfl_dense": 1, "dfl": 2}


def reduced_loss(
    op: str,
    pred: torch.Tensor,
    targets: tuple,
    params: tuple,
    weight: torch.Tensor | None,
    unit: float,
) -> torch.Tensor:
    """The 0-d loss ``sum_i l_i * weight_i * unit`` of operator ``op`` ('qfl' | 'qfl_dense' |
    'dfl') with its C++ autograd node (csrc/autograd.cpp, ``ReducedLossFunction``).

    Args:
        pred: (N, K) logits that require grad (plain eager tensor: see ``applies``).
        targets: the operator's targets ((labels, scores), (target,) or (target,)).
        params: (beta, activated) for QFL, () for DFL.
        weight: optional (N,) row weights (not requiring grad).
        unit: ``reduction_unit(...)``.
    """
    scores = targets[1] if op == "qfl" else None
    beta, activated = params if params else (0.0, False)
    if weight is not None:
        weight = weight.detach()
    return _C.reduced_loss_eager(
        pred, targets[0], scores, weight, unit, _KINDS[op], beta, activated
    )


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
