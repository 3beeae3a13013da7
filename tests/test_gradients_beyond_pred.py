"""Gradients the kernels do not compute themselves: targets that require grad, and double backward.

Every fused backend must give the same derivatives as the float64 reference formulas, or raise:
never a silently missing term (gfl_ops.functional's docstring, gfl_ops/_second_order.py).
"""

from __future__ import annotations

import pytest
import torch

import gfl_ops

N, C, BINS = 7, 5, 9


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(N, C, generator=gen, dtype=torch.float64) * 2
    labels = torch.tensor([0, 5, 2, 4, -1, 1, 3])
    scores = torch.rand(N, generator=gen, dtype=torch.float64)
    dense = torch.rand(N, C, generator=gen, dtype=torch.float64) * (torch.rand(N, C) > 0.6)
    dfl_pred = torch.randn(N, BINS, generator=gen, dtype=torch.float64) * 2
    dfl_target = torch.rand(N, generator=gen, dtype=torch.float64) * (BINS - 1)
    return pred, labels, scores, dense, dfl_pred, dfl_target


def _losses(backend):
    """name -> (fn(pred, target) -> loss, pred, target) for each loss with a target."""
    pred, labels, scores, dense, dfl_pred, dfl_target = _inputs()
    return {
        "qfl": (
            lambda p, t: gfl_ops.quality_focal_loss(
                p, (labels, t), backend=backend, reduction="sum"
            ),
            pred,
            scores,
        ),
        "qfl_dense": (
            lambda p, t: gfl_ops.quality_focal_loss(
                p, t, backend=backend, beta=1.5, reduction="sum"
            ),
            pred,
            dense,
        ),
        "dfl": (
            lambda p, t: gfl_ops.distribution_focal_loss(p, t, backend=backend, reduction="sum"),
            dfl_pred,
            dfl_target,
        ),
    }


@pytest.mark.parametrize("name", ["qfl", "qfl_dense", "dfl"])
def test_target_that_requires_grad_gets_its_gradient(backend_device, name):
    backend, device = backend_device
    fn, pred, target = _losses(backend)[name]
    pred = pred.to(device).requires_grad_(True)
    target = target.to(device).requires_grad_(True)
    got = torch.autograd.grad(fn(pred, target), (pred, target))
    ref_fn = _losses("reference")[name][0]
    want = torch.autograd.grad(ref_fn(pred, target), (pred, target))
    for g, w, what in zip(got, want, ("pred", "target")):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"{name} d/d{what}")
    # and the target gradient is really there (not zero by accident)
    assert got[1].abs().sum() > 0


@pytest.mark.parametrize("name", ["qfl", "qfl_dense", "dfl", "integral"])
def test_double_backward_matches_reference(backend_device, name):
    """grad of (||dL/dpred||^2 + <dL/dpred, w>) wrt pred: exercises the Hessian-vector product
    and the derivative with respect to the incoming gradient."""
    backend, device = backend_device
    if name == "integral":
        pred = _inputs()[4]

        def fn(p, b):
            return (
                gfl_ops.integral(p, backend=b)
                * torch.linspace(0.5, 2, N, device=device, dtype=p.dtype)
            ).sum()
    else:
        fn0, pred, target = _losses(backend)[name]
        ref0 = _losses("reference")[name][0]
        target = target.to(device)

        def fn(p, b):
            return (fn0 if b == backend else ref0)(p, target)

    pred = pred.to(device)
    w = torch.randn(pred.shape, dtype=pred.dtype, generator=torch.Generator().manual_seed(3))
    w = w.to(device)

    def second(b):
        p = pred.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(p, b), p, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum() + (g * w).sum(), p)[0]

    torch.testing.assert_close(second(backend), second("reference"), rtol=1e-9, atol=1e-12)


def test_double_backward_through_a_scaled_loss(backend_device):
    """The incoming gradient of the loss depends on pred (loss * loss): the derivative with
    respect to grad_loss is exercised through the chain rule."""
    backend, device = backend_device
    pred = _inputs()[4].to(device)
    target = _inputs()[5].to(device)

    def second(b):
        p = pred.clone().requires_grad_(True)
        loss = gfl_ops.distribution_focal_loss(p, target, backend=b, reduction="none")
        (g,) = torch.autograd.grad(loss.pow(2).sum(), p, create_graph=True)
        return torch.autograd.grad(g.sum(), p)[0]

    torch.testing.assert_close(second(backend), second("reference"), rtol=1e-9, atol=1e-12)


def test_third_derivative_raises(backend_device):
    backend, device = backend_device
    p = _inputs()[4].to(device).requires_grad_(True)
    (g,) = torch.autograd.grad(gfl_ops.integral(p, backend=backend).sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match="third and higher derivatives"):
        torch.autograd.grad(g.pow(2).sum(), p, create_graph=True)
