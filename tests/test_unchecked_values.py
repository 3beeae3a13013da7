"""Values the value checks reject, with the checks off: one defined result on every backend.

The checks (on by default) refuse DFL targets outside [0, n] or NaN, and activated QFL inputs
outside [0, 1] or NaN.  They are off with ``check_values=False``, ``set_value_checks(False)`` and
inside ``torch.compile`` graphs and CUDA-graph capture; the same input must then still give the
same loss and gradient whichever backend runs it, the ``reference`` backend included: it is a
user-selectable backend, and it runs every call whose targets require grad.  What they give:

* DFL: the target is clamped into [0, n]; a NaN target gives its row a NaN loss, and NaN
  gradients in its first two bins (the split of a NaN target, csrc/gfl_math.h's dfl_split).
* Activated QFL: a probability outside [0, 1] is taken as the nearer bound, loss and gradient
  alike (csrc/gfl_math.h's clamp_prob); a NaN probability gives its anchor a NaN loss and
  itself a NaN gradient, the other elements' gradients staying finite.

The CUDA kernels' versions run in tests/test_cuda_emulated.py
(``test_emulated_qfl_probabilities_outside_0_1``) and, on a GPU, through ``backend_device``.
"""

from __future__ import annotations

import pytest
import torch
from gfl_testing import GRAD_TOL, LOSS_TOL, assert_close

import gfl_ops
from gfl_ops import reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _loss_and_grad(fn, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = pred.detach().clone().requires_grad_(True)
    loss = fn(pred)
    # a different upstream gradient per row, so a row-mixing mistake shows
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device))
    return loss.detach(), pred.grad


def _assert_same(got, expected, dtype, what):
    (loss, grad), (ref_loss, ref_grad) = got, expected
    assert_close(loss, ref_loss.to(loss.dtype), LOSS_TOL[dtype], what + " loss")
    assert_close(grad, ref_grad.to(grad.dtype), GRAD_TOL[dtype], what + " gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dfl_targets_outside_0_n_are_clamped(any_backend_device, dtype):
    backend, device = any_backend_device
    gen = torch.Generator().manual_seed(3)
    pred = (torch.randn(6, 17, generator=gen) * 3).to(device, dtype)
    target = torch.tensor([-3.0, -1e-3, 16.5, 1e6, 0.0, 16.0], device=device)
    clamped = torch.tensor([0.0, 0.0, 16.0, 16.0, 0.0, 16.0], device=device)

    def dfl(t):
        return lambda p: gfl_ops.distribution_focal_loss(
            p, t, reduction="none", backend=backend, check_values=False
        )

    got = _loss_and_grad(dfl(target), pred)
    expected = _loss_and_grad(
        lambda p: reference.distribution_focal_loss(p, clamped.double()), pred.double()
    )
    _assert_same(got, expected, dtype, f"{backend} {dtype}")


def test_dfl_nan_target_gives_its_row_only_nan(any_backend_device):
    backend, device = any_backend_device
    pred = torch.randn(3, 17, generator=torch.Generator().manual_seed(4)).to(device)
    target = torch.tensor([2.5, float("nan"), 7.0], device=device)
    loss, grad = _loss_and_grad(
        lambda p: gfl_ops.distribution_focal_loss(
            p, target, reduction="none", backend=backend, check_values=False
        ),
        pred,
    )
    assert loss.isnan().tolist() == [False, True, False]
    # the row is split into bins (0, 1) with NaN weights (csrc/gfl_math.h's dfl_split)
    assert grad.isnan().nonzero().tolist() == [[1, 0], [1, 1]]


def _qfl_probabilities(device, dtype):
    """(N, C) probabilities with every out-of-range kind, labels and scores; and the same
    clamped, for the float64 oracle."""
    gen = torch.Generator().manual_seed(5)
    p = torch.rand(6, 4, generator=gen, dtype=torch.float64).clamp(0.05, 0.95)
    p[0, 0], p[0, 1] = 1.5, -0.25  # positive's class above 1, a negative below 0
    p[1, 2], p[1, 3] = 1e4, -1e4
    p[2, 0], p[2, 1] = 1.0, 0.0  # the bounds themselves: valid
    p[3, 3] = 1.0 + 2**-20  # just outside, as a user's rounding might leave it
    labels = torch.tensor([0, 2, 0, 3, 4, -1])
    scores = torch.rand(6, generator=gen, dtype=torch.float64)
    pred = p.to(device, dtype)
    clamped = pred.double().cpu().clamp(0.0, 1.0)
    return pred, labels.to(device), scores.to(device), clamped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["labels", "dense"])
def test_activated_qfl_probabilities_outside_0_1_are_taken_as_the_bound(
    any_backend_device, dtype, form
):
    backend, device = any_backend_device
    pred, labels, scores, clamped = _qfl_probabilities(device, dtype)
    dense = torch.rand(pred.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    target = (labels, scores.to(dtype)) if form == "labels" else dense.to(device, dtype)
    if form == "labels":

        def oracle(p):
            return reference.quality_focal_loss(
                p, labels.cpu(), target[1].cpu().double(), 2.0, True
            )
    else:

        def oracle(p):
            return reference.quality_focal_loss_dense(p, dense.to(dtype).double(), 2.0, True)

    loss, grad = _loss_and_grad(
        lambda p: gfl_ops.quality_focal_loss(
            p, target, reduction="none", activated=True, backend=backend, check_values=False
        ),
        pred,
    )
    ref_loss, ref_grad = _loss_and_grad(oracle, clamped)
    what = f"{backend} {dtype} {form}"
    _assert_same((loss.cpu(), grad.cpu()), (ref_loss, ref_grad), dtype, what)


def test_activated_qfl_nan_probability(any_backend_device):
    backend, device = any_backend_device
    pred = torch.full((3, 4), 0.3, device=device)
    pred[1, 2] = float("nan")
    labels = torch.tensor([0, 2, 4], device=device)
    scores = torch.tensor([0.5, 0.9, 0.0], device=device)
    loss, grad = _loss_and_grad(
        lambda p: gfl_ops.quality_focal_loss(
            p,
            (labels, scores),
            reduction="none",
            activated=True,
            backend=backend,
            check_values=False,
        ),
        pred,
    )
    assert loss.isnan().tolist() == [False, True, False]
    assert grad.isnan().nonzero().tolist() == [[1, 2]], "only the NaN element's gradient is NaN"


def test_a_target_requiring_grad_gets_the_same_unchecked_result(backend_device):
    """Such a call runs the reference formulas (the kernels treat targets as constants): its
    loss and pred gradient are the fused call's, and the target's gradient is the clamp's."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(7)
    pred = torch.randn(5, 17, generator=gen).to(device)
    target = torch.tensor([-2.0, 0.0, 8.25, 16.0, 30.0], device=device)

    def dfl(t):
        return lambda p: gfl_ops.distribution_focal_loss(
            p, t, reduction="none", backend=backend, check_values=False
        )

    fused = _loss_and_grad(dfl(target), pred)
    target_with_grad = target.clone().requires_grad_(True)
    with_grad = _loss_and_grad(dfl(target_with_grad), pred)
    _assert_same(with_grad, fused, torch.float32, f"{backend} target requiring grad")
    # clamped targets get 0; 0 and n (valid) and the interior get the loss's slope
    assert target_with_grad.grad[[0, 4]].eq(0).all()
    assert target_with_grad.grad[[1, 2, 3]].ne(0).all()


def test_double_backward_agrees_on_unchecked_values(backend_device):
    """The second-order term (gfl_ops/_second_order.py) follows the same clamps."""
    backend, device = backend_device
    pred, labels, scores, _ = _qfl_probabilities(device, torch.float64)
    dfl_pred = torch.randn(3, 17, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    dfl_target = torch.tensor([-1.0, 8.5, 99.0], dtype=torch.float64)
    calls = {
        "qfl": (
            lambda p, b: gfl_ops.quality_focal_loss(
                p, (labels, scores), activated=True, backend=b, check_values=False
            ),
            pred,
        ),
        "dfl": (
            lambda p, b: gfl_ops.distribution_focal_loss(
                p, dfl_target.to(device), backend=b, check_values=False
            ),
            dfl_pred.to(device),
        ),
    }
    for name, (call, p0) in calls.items():
        results = []
        for b in (backend, "reference"):
            p = p0.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(call(p, b), p, create_graph=True)
            (gg,) = torch.autograd.grad((g * g).sum(), p)
            results.append((g.detach(), gg))
        for got, expected, what in zip(results[0], results[1], ("gradient", "second order")):
            assert_close(got, expected, GRAD_TOL[torch.float64], f"{backend} {name} {what}")
