"""The operators under torch.func transforms (grad, jacrev, jvp, vmap, per-sample gradients) and
forward-mode AD (torch.autograd.forward_ad).

The fused operators' autograd is a C++ node, which torch refuses under functorch transforms
("cannot use C++ torch::autograd::Function with functorch transforms") and in forward mode ("jvp
is not implemented for the c++ API of custom Function"), and vmap would run a custom operator
one sample at a time.  So a call whose arguments a transform wrapped, or that forward-mode AD
gave a tangent, takes the reference formulas (gfl_ops.functional._under_autodiff_transform):
these tests check that it gives what the fused operators give outside the transform.  Under vmap
the value checks cannot read values and are skipped, as in torch.compile graphs
(tests/test_unchecked_values.py gives the meaning of unchecked values); under grad and jvp they
still run."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from gfl_testing import GRAD_TOL, LOSS_TOL, assert_close

import gfl_ops

F64 = torch.float64


def _inputs(seed=0, batch=None):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return {
        "qfl_pred": torch.randn(*lead, 6, 5, generator=gen, dtype=F64) * 2,
        "labels": torch.randint(-1, 6, (6,), generator=gen),
        "scores": torch.rand(*lead, 6, generator=gen, dtype=F64),
        "dfl_pred": torch.randn(*lead, 8, 17, generator=gen, dtype=F64) * 2,
        "dfl_target": torch.rand(*lead, 8, generator=gen, dtype=F64) * 16,
    }


def _qfl(pred, labels, scores):
    return gfl_ops.quality_focal_loss(pred, (labels, scores), avg_factor=3.0)


def _dfl(pred, target):
    return gfl_ops.distribution_focal_loss(pred, target, reduction="sum")


def _fused_grad(fn, pred, *rest):
    leaf = pred.detach().clone().requires_grad_(True)
    fn(leaf, *rest).backward()
    return leaf.grad


def test_grad_and_jacrev_match_the_fused_gradient():
    x = _inputs()
    got = torch.func.grad(_qfl)(x["qfl_pred"], x["labels"], x["scores"])
    expected = _fused_grad(_qfl, x["qfl_pred"], x["labels"], x["scores"])
    assert_close(got, expected, GRAD_TOL[F64], "grad of QFL")
    got = torch.func.grad(_dfl)(x["dfl_pred"], x["dfl_target"])
    assert_close(
        got, _fused_grad(_dfl, x["dfl_pred"], x["dfl_target"]), GRAD_TOL[F64], "grad of DFL"
    )
    pred = x["dfl_pred"][:3]
    jac = torch.func.jacrev(gfl_ops.integral)(pred)  # (3, 3, 17): row i depends on row i only
    for i in range(3):
        expected = _fused_grad(lambda p, i=i: gfl_ops.integral(p)[i], pred)
        assert_close(jac[i], expected, GRAD_TOL[F64], f"jacrev row {i}")


def test_per_sample_gradients():
    """vmap(grad(loss)) over a batch: each sample's gradient, as a loop of fused calls gives."""
    x = _inputs(seed=1, batch=4)
    got = torch.func.vmap(torch.func.grad(_dfl))(x["dfl_pred"], x["dfl_target"])
    for b in range(4):
        expected = _fused_grad(_dfl, x["dfl_pred"][b], x["dfl_target"][b])
        assert_close(got[b], expected, GRAD_TOL[F64], f"DFL sample {b}")
    labels = x["labels"]
    got = torch.func.vmap(torch.func.grad(_qfl), in_dims=(0, None, 0))(
        x["qfl_pred"], labels, x["scores"]
    )
    for b in range(4):
        expected = _fused_grad(_qfl, x["qfl_pred"][b], labels, x["scores"][b])
        assert_close(got[b], expected, GRAD_TOL[F64], f"QFL sample {b}")
    # each sample its own labels (the reference labels form's nonzero cannot be batched; such a
    # call takes the equal dense target, functional._scores_at_labels)
    batch_labels = torch.randint(-1, 7, (4, 6), generator=torch.Generator().manual_seed(1))
    got = torch.func.vmap(torch.func.grad(_qfl))(x["qfl_pred"], batch_labels, x["scores"])
    for b in range(4):
        expected = _fused_grad(_qfl, x["qfl_pred"][b], batch_labels[b], x["scores"][b])
        assert_close(got[b], expected, GRAD_TOL[F64], f"QFL sample {b}, own labels")


def test_vmap_of_the_losses_and_the_integral():
    x = _inputs(seed=2, batch=3)
    got = torch.vmap(_qfl, in_dims=(0, None, 0))(x["qfl_pred"], x["labels"], x["scores"])
    expected = torch.stack([_qfl(x["qfl_pred"][b], x["labels"], x["scores"][b]) for b in range(3)])
    assert_close(got, expected, LOSS_TOL[F64], "vmap QFL")
    got = torch.vmap(_dfl)(x["dfl_pred"], x["dfl_target"])
    expected = torch.stack([_dfl(x["dfl_pred"][b], x["dfl_target"][b]) for b in range(3)])
    assert_close(got, expected, LOSS_TOL[F64], "vmap DFL")
    got = torch.vmap(gfl_ops.Integral(16))(x["dfl_pred"].reshape(3, 2, 68))
    assert got.shape == (3, 2, 4)
    assert_close(got.reshape(3, 8), gfl_ops.integral(x["dfl_pred"]), LOSS_TOL[F64], "integral")


def test_value_checks_under_transforms():
    """grad still checks (it can read values); vmap cannot, so its values are unchecked."""
    x = _inputs(seed=3)
    bad = x["dfl_target"].clone()
    bad[0] = 40.0
    with pytest.raises(ValueError, match=r"target must lie in \[0, 16\]"):
        torch.func.grad(_dfl)(x["dfl_pred"], bad)
    batched = torch.vmap(_dfl)(x["dfl_pred"][None], bad[None])
    clamped = bad.clamp(max=16.0)
    assert_close(batched[0], _dfl(x["dfl_pred"], clamped), LOSS_TOL[F64], "vmap, clamped")


def _jvp(how, fn, primal, tangent):
    """(fn(primal), its directional derivative along tangent) by torch.func.jvp or dual tensors."""
    if how == "torch.func.jvp":
        return torch.func.jvp(fn, (primal,), (tangent,))
    with fwAD.dual_level():
        out = fwAD.unpack_dual(fn(fwAD.make_dual(primal, tangent)))
        return out.primal, out.tangent


@pytest.mark.parametrize("how", ["torch.func.jvp", "forward_ad"])
def test_forward_mode_ad_matches_the_fused_gradient(how):
    """Each operator's forward-mode derivative along a random tangent: <fused gradient, tangent>
    (for the integral, per output row), and its value that of the fused call; a tangent on a
    target (DFL's distances, QFL's scores) too, against the reverse-mode target gradient."""
    x = _inputs(seed=4)
    gen = torch.Generator().manual_seed(4)
    dense = torch.rand(6, 5, generator=gen, dtype=F64) * (torch.rand(6, 5, generator=gen) < 0.3)
    probs = torch.rand(6, 5, generator=gen, dtype=F64)
    cases = {
        "QFL (labels, scores)": (lambda p: _qfl(p, x["labels"], x["scores"]), x["qfl_pred"]),
        "QFL dense": (lambda p: gfl_ops.quality_focal_loss(p, dense, beta=1.5), x["qfl_pred"]),
        "QFL activated": (
            lambda p: gfl_ops.quality_focal_loss(p, dense, activated=True, reduction="sum"),
            probs,
        ),
        "DFL": (lambda p: _dfl(p, x["dfl_target"]), x["dfl_pred"]),
        "DFL's target": (lambda t: _dfl(x["dfl_pred"], t), x["dfl_target"]),
        "QFL's scores": (lambda s: _qfl(x["qfl_pred"], x["labels"], s), x["scores"]),
    }
    for name, (fn, primal) in cases.items():
        tangent = torch.randn(primal.shape, generator=gen, dtype=F64)
        value, derivative = _jvp(how, fn, primal, tangent)
        assert_close(value, fn(primal), LOSS_TOL[F64], f"{how} {name}: value")
        expected = (_fused_grad(fn, primal) * tangent).sum()
        assert_close(derivative, expected, GRAD_TOL[F64], f"{how} {name}: derivative")
    pred = x["dfl_pred"][:3]
    tangent = torch.randn(pred.shape, generator=gen, dtype=F64)
    _, derivative = _jvp(how, gfl_ops.integral, pred, tangent)
    expected = torch.stack(
        [
            (_fused_grad(lambda p, i=i: gfl_ops.integral(p)[i], pred) * tangent).sum()
            for i in range(3)
        ]
    )
    assert_close(derivative, expected, GRAD_TOL[F64], f"{how} integral")


def test_value_checks_under_forward_mode_ad():
    x = _inputs(seed=5)
    bad = x["dfl_target"].clone()
    bad[0] = -1.0
    with pytest.raises(ValueError, match=r"target must lie in \[0, 16\]"):
        _jvp("forward_ad", lambda p: _dfl(p, bad), x["dfl_pred"], torch.ones_like(x["dfl_pred"]))
