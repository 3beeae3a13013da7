"""Distribution Focal Loss: every fused backend against the float64 reference, and the paper's
properties (minimum at S_l = y_r - y, S_r = y - y_l; the integral recovers y; DFL = GFL(beta=0);
Eq. 7's minimum at p*)."""

from __future__ import annotations

import pytest
import torch
from gfl_testing import DTYPES, compare_to_reference, run_with_grad
from hypothesis import given
from hypothesis import strategies as st

import gfl_ops


@st.composite
def dfl_case(draw):
    return dict(
        m=draw(st.integers(0, 64)),
        bins=draw(st.sampled_from([2, 3, 8, 17, 33])),
        dtype=draw(st.sampled_from(DTYPES)),
        scale=draw(st.sampled_from([0.5, 3.0, 10.0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        weighted=draw(st.booleans()),
        avg=draw(st.sampled_from([None, 4.0])),
        integer_targets=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make_dfl_inputs(case: dict, device: str):
    gen = torch.Generator().manual_seed(case["seed"])
    m, bins = case["m"], case["bins"]
    n = bins - 1
    pred = torch.randn(m, bins, generator=gen, dtype=torch.float64) * case["scale"]
    target = torch.rand(m, generator=gen, dtype=torch.float64) * n
    if case["integer_targets"]:
        target = target.round()  # includes 0 and n: the exact edge bins
    if m:
        target[0] = n  # always exercise target == n
    weight = torch.rand(m, generator=gen, dtype=torch.float64) if case["weighted"] else None
    return (
        pred.to(case["dtype"]).to(device),
        target.to(device),
        None if weight is None else weight.to(device),
    )


@given(case=dfl_case())
def test_dfl_matches_reference(backend_device, case):
    backend, device = backend_device
    pred, target, weight = make_dfl_inputs(case, device)
    avg = case["avg"] if case["reduction"] == "mean" else None

    def call(p, backend, target, weight):
        return gfl_ops.distribution_focal_loss(
            p, target, weight=weight, reduction=case["reduction"], avg_factor=avg, backend=backend
        )

    compare_to_reference(
        call, pred, backend, {"target": target, "weight": weight}, what=f"dfl {case}"
    )


@pytest.mark.parametrize("y", [0.0, 0.3, 2.5, 7.99, 15.2, 16.0])
def test_dfl_minimum_and_integral_recover_target(backend_device, y):
    """At S_l = y_r - y, S_r = y - y_l (all other bins ~0) the gradient vanishes, the loss is
    minimal among perturbations, and the integral of that distribution is y."""
    backend, device = backend_device
    n = 16
    left = min(int(y), n - 1)
    probs = torch.full((n + 1,), 1e-30, dtype=torch.float64)
    probs[left] = (left + 1) - y
    probs[left + 1] = y - left
    logits = probs.clamp_min(1e-30).log().unsqueeze(0).to(device)
    target = torch.tensor([y], dtype=torch.float64, device=device)
    loss, grad = run_with_grad(
        lambda p: gfl_ops.distribution_focal_loss(p, target, reduction="none", backend=backend),
        logits,
    )
    assert grad.abs().max().item() < 1e-9
    decoded = gfl_ops.integral(logits, backend=backend)
    assert decoded.item() == pytest.approx(y, abs=1e-9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        moved = logits + 0.05 * torch.randn(logits.shape, generator=gen, dtype=torch.float64).to(
            device
        )
        moved_loss = gfl_ops.distribution_focal_loss(
            moved, target, reduction="none", backend=backend
        )
        assert moved_loss.item() >= loss.item() - 1e-12


def gfl_eq7(p_left: torch.Tensor, y: float, y_l: float, y_r: float, beta: float):
    """GFL (paper Eq. 7) for two bins with probabilities (p_left, 1 - p_left)."""
    p_right = 1 - p_left
    estimate = y_l * p_left + y_r * p_right
    return -((y - estimate).abs() ** beta) * ((y_r - y) * p_left.log() + (y - y_l) * p_right.log())


@pytest.mark.parametrize("y", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_gfl_eq7_minimum_at_p_star(y, beta):
    """Appendix B: Eq. 7 is minimal at p_l* = (y_r - y) / (y_r - y_l)."""
    p = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    values = gfl_eq7(p, y, 0.0, 1.0, beta)
    p_star = (1.0 - y) / (1.0 - 0.0)
    assert p[values.argmin()].item() == pytest.approx(p_star, abs=2e-4)


def test_dfl_is_gfl_with_beta_zero(backend_device):
    """Appendix C: with two bins (y_l, y_r) = (0, 1), DFL equals GFL with beta = 0."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 2, generator=gen, dtype=torch.float64) * 3
    y = torch.rand(50, generator=gen, dtype=torch.float64)
    ours = gfl_ops.distribution_focal_loss(
        logits.to(device), y.to(device), reduction="none", backend=backend
    )
    p_left = logits.softmax(dim=1)[:, 0]
    expected = gfl_eq7(p_left, y, 0.0, 1.0, 0.0)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-9, atol=1e-12)


def test_dfl_gradcheck_float64(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(5, 17, generator=gen, dtype=torch.float64).to(device)
    target = torch.tensor([0.0, 3.3, 15.5, 16.0, 7.0], dtype=torch.float64, device=device)
    torch.autograd.gradcheck(
        lambda p: gfl_ops.distribution_focal_loss(p, target, reduction="none", backend=backend),
        (pred.requires_grad_(),),
    )


def test_dfl_target_equal_to_n_is_exact(backend_device):
    backend, device = backend_device
    pred = torch.randn(3, 17, dtype=torch.float32, device=device)
    target = torch.full((3,), 16.0, device=device)
    loss = gfl_ops.distribution_focal_loss(pred, target, reduction="none", backend=backend)
    expected = -torch.log_softmax(pred.double(), dim=1)[:, 16]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
