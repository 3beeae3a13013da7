"""Public API: mmdetection semantics of weight / reduction / avg_factor, the modules, backend
selection, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

import gfl_ops
from gfl_ops import _registry


def _qfl_inputs(n=6, c=4, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(n, c, generator=gen).to(device)
    labels = torch.tensor([0, 4, 2, 4, 3, 1][:n]).to(device)
    scores = torch.rand(n, generator=gen).to(device)
    return pred, (labels, scores)


def test_public_names():
    for name in (
        "quality_focal_loss",
        "distribution_focal_loss",
        "integral",
        "QualityFocalLoss",
        "DistributionFocalLoss",
        "Integral",
        "available_backends",
    ):
        assert hasattr(gfl_ops, name)
    assert "reference" in gfl_ops.available_backends()
    assert "cpu" in gfl_ops.available_backends("cpu"), gfl_ops.backend_status("cpu")


def test_reductions_follow_mmdetection(backend_device):
    backend, device = backend_device
    pred, target = _qfl_inputs(device=device)
    weight = torch.linspace(0.5, 1.5, 6, device=device)
    none = gfl_ops.quality_focal_loss(pred, target, weight, reduction="none", backend=backend)
    assert none.shape == (6,)
    total = gfl_ops.quality_focal_loss(pred, target, weight, reduction="sum", backend=backend)
    mean = gfl_ops.quality_focal_loss(pred, target, weight, reduction="mean", backend=backend)
    avg = gfl_ops.quality_focal_loss(
        pred, target, weight, reduction="mean", avg_factor=3.0, backend=backend
    )
    avg_t = gfl_ops.quality_focal_loss(
        pred,
        target,
        weight,
        reduction="mean",
        avg_factor=torch.tensor(3.0, device=device),
        backend=backend,
    )
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.mean())
    torch.testing.assert_close(avg, none.sum() / (3.0 + eps))
    torch.testing.assert_close(avg_t, avg)
    with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
        gfl_ops.quality_focal_loss(pred, target, reduction="sum", avg_factor=2.0, backend=backend)


def test_modules_match_functional(backend_device):
    backend, device = backend_device
    pred, target = _qfl_inputs(device=device)
    qfl = gfl_ops.QualityFocalLoss(beta=2.0, loss_weight=0.5, backend=backend)
    expected = 0.5 * gfl_ops.quality_focal_loss(pred, target, avg_factor=2.0, backend=backend)
    torch.testing.assert_close(qfl(pred, target, avg_factor=2.0), expected)
    assert qfl(pred, target, reduction_override="none").shape == (6,)

    dfl = gfl_ops.DistributionFocalLoss(loss_weight=0.25, backend=backend)
    p = torch.randn(8, 17, device=device)
    t = torch.rand(8, device=device) * 16
    w = torch.rand(8, device=device)
    torch.testing.assert_close(
        dfl(p, t, w, avg_factor=4.0),
        0.25 * gfl_ops.distribution_focal_loss(p, t, w, avg_factor=4.0, backend=backend),
    )
    with pytest.raises(ValueError, match="use_sigmoid"):
        gfl_ops.QualityFocalLoss(use_sigmoid=False)
    with pytest.raises(ValueError, match="reduction_override"):
        qfl(pred, target, reduction_override="max")


def test_integral_module_exports_softmax_matmul_for_onnx():
    """The fused op has no ONNX symbolic; under export the module lowers to Softmax + MatMul."""
    module = gfl_ops.Integral(reg_max=7)
    x = torch.randn(3, 32)
    traced = torch.jit.trace(lambda t: gfl_ops.reference.integral(t.reshape(-1, 8)), (x,))
    torch.testing.assert_close(module(x).reshape(-1), traced(x))
    with pytest.raises(ValueError, match=r"\(N, 4\*\(reg_max\+1\)\) = \(N, 32\)"):
        module(torch.randn(3, 30))


def test_backend_selection(monkeypatch):
    pred, target = _qfl_inputs()
    monkeypatch.setenv("GFL_OPS_BACKEND", "reference")
    assert _registry.resolve(None, pred.device, "qfl").name == "reference"
    assert _registry.resolve("cpu", pred.device, "qfl").name == "cpu"  # argument wins
    monkeypatch.setenv("GFL_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$GFL_OPS_BACKEND must be one of"):
        gfl_ops.quality_focal_loss(pred, target)
    monkeypatch.delenv("GFL_OPS_BACKEND")
    assert _registry.resolve(None, pred.device, "qfl").name == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        gfl_ops.quality_focal_loss(pred, target, backend="fast")


def test_unavailable_backend_names_the_ones_that_can():
    pred, target = _qfl_inputs()
    with pytest.raises(
        RuntimeError,
        match=r"'cuda' cannot run on cpu tensors.*Backends that "
        r"can: cpu",
    ):
        gfl_ops.quality_focal_loss(pred, target, backend="cuda")
    status = gfl_ops.backend_status("cpu")
    assert status["cpu"] == "available" and "cuda" in status["cuda"]


# --- bad input: each error names the argument and the expected form -------------------------

N, C = 6, 4


def _bad_qfl_cases():
    pred, (labels, scores) = _qfl_inputs()
    return [
        (
            "pred 1-D",
            dict(pred=pred[:, 0], target=(labels, scores)),
            ValueError,
            r"pred must have"
            r" shape \(N, C\)",
        ),
        (
            "pred integer",
            dict(pred=pred.long(), target=(labels, scores)),
            TypeError,
            "pred must be a floating-point tensor",
        ),
        (
            "pred list",
            dict(pred=[[0.0]], target=(labels, scores)),
            TypeError,
            "pred must be a torch.Tensor",
        ),
        (
            "float labels",
            dict(pred=pred, target=(labels.float(), scores)),
            TypeError,
            "target labels must be an integer tensor",
        ),
        (
            "labels shape",
            dict(pred=pred, target=(labels[:3], scores)),
            ValueError,
            r"target labels must have shape \(6,\)",
        ),
        (
            "scores int",
            dict(pred=pred, target=(labels, labels)),
            TypeError,
            "target scores must be a floating-point tensor",
        ),
        (
            "scores > 1",
            dict(pred=pred, target=(labels, scores + 2)),
            ValueError,
            r"target scores must lie in \[0, 1\]",
        ),
        (
            "NaN scores",
            dict(pred=pred, target=(labels, scores * float("nan"))),
            ValueError,
            r"target scores must lie in \[0, 1\]",
        ),
        (
            "three-tuple",
            dict(pred=pred, target=(labels, scores, scores)),
            ValueError,
            "target must be",
        ),
        (
            "dense shape",
            dict(pred=pred, target=torch.rand(6, 5)),
            ValueError,
            "a dense target must have the shape of pred",
        ),
        (
            "weight shape",
            dict(pred=pred, target=(labels, scores), weight=torch.ones(6, 1)),
            ValueError,
            r"weight must have shape \(6,\)",
        ),
        (
            "reduction",
            dict(pred=pred, target=(labels, scores), reduction="avg"),
            ValueError,
            "reduction must be one of",
        ),
        (
            "beta negative",
            dict(pred=pred, target=(labels, scores), beta=-1.0),
            ValueError,
            "beta must be a finite number >= 0",
        ),
        (
            "beta nan",
            dict(pred=pred, target=(labels, scores), beta=float("nan")),
            ValueError,
            "beta must be a finite number >= 0",
        ),
        (
            "avg_factor vector",
            dict(pred=pred, target=(labels, scores), avg_factor=torch.ones(2)),
            ValueError,
            "avg_factor must be a number or a one-element tensor",
        ),
        (
            "activated out of range",
            dict(pred=pred * 5, target=(labels, scores), activated=True),
            ValueError,
            r"probabilities in \[0, 1\] when activated=True",
        ),
        (
            "unknown backend",
            dict(pred=pred, target=(labels, scores), backend="gpu"),
            ValueError,
            "backend must be one of",
        ),
    ]


@pytest.mark.parametrize(
    "name,kwargs,exc,match", _bad_qfl_cases(), ids=[c[0] for c in _bad_qfl_cases()]
)
def test_qfl_bad_input(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gfl_ops.quality_focal_loss(**kwargs)


@pytest.mark.parametrize(
    "target,match",
    [
        (torch.tensor([0.0, 17.0, 3.0]), r"target must lie in \[0, 16\]"),
        (torch.tensor([0.0, -0.5, 3.0]), r"target must lie in \[0, 16\]"),
        (torch.tensor([0.0, float("nan"), 3.0]), r"target must lie in \[0, 16\]"),
        (torch.tensor([0.0, 1.0]), r"target must have shape \(3,\)"),
        (torch.tensor([0, 1, 2]), "target must be a floating-point tensor"),
    ],
)
def test_dfl_bad_target(target, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gfl_ops.distribution_focal_loss(torch.randn(3, 17), target)


def test_dfl_and_integral_bad_pred():
    with pytest.raises(ValueError, match="at least 2 bins"):
        gfl_ops.distribution_focal_loss(torch.randn(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2 bins"):
        gfl_ops.integral(torch.randn(3, 1))
    with pytest.raises(TypeError, match="pred must be a floating-point tensor"):
        gfl_ops.integral(torch.ones(3, 4, dtype=torch.int32))


def test_device_kernels_clamp_dfl_targets_when_checks_are_off(backend_device):
    """Without value checks (CUDA default, compiled graphs) the kernels clamp DFL targets into
    [0, n], and a NaN target gives a NaN loss for its row only: documented behaviour."""
    backend, device = backend_device
    pred = torch.randn(4, 17, device=device)
    target = torch.tensor([-3.0, 20.0, float("nan"), 5.5], device=device)
    # the backend object is what the public API calls after its (here skipped) value checks
    impl = _registry.resolve(backend, pred.device, "dfl")
    loss = impl.dfl(pred, target)
    clamped = gfl_ops.distribution_focal_loss(
        pred[[0, 1, 3]],
        torch.tensor([0.0, 16.0, 5.5], device=device),
        reduction="none",
        backend=backend,
    )
    torch.testing.assert_close(loss[[0, 1, 3]], clamped)
    assert torch.isnan(loss[2])


def test_value_checks_switch():
    """Checks are on by default; the global switch and ``check_values=`` turn them off, and then
    the kernels' documented clamping applies."""
    pred, (labels, scores) = _qfl_inputs()
    with pytest.raises(ValueError, match=r"target scores must lie in \[0, 1\]"):
        gfl_ops.quality_focal_loss(pred, (labels, scores + 9))
    gfl_ops.quality_focal_loss(pred, (labels, scores + 9), check_values=False)
    dfl_pred, dfl_target = torch.randn(3, 17), torch.tensor([0.0, 20.0, 3.0])
    gfl_ops.set_value_checks(False)
    try:
        clamped = gfl_ops.distribution_focal_loss(dfl_pred, dfl_target, reduction="none")
        with pytest.raises(ValueError, match=r"target must lie in \[0, 16\]"):
            gfl_ops.distribution_focal_loss(dfl_pred, dfl_target, check_values=True)
    finally:
        gfl_ops.set_value_checks(True)
    torch.testing.assert_close(
        clamped,
        gfl_ops.distribution_focal_loss(dfl_pred, torch.tensor([0.0, 16.0, 3.0]), reduction="none"),
    )
    with pytest.raises(ValueError, match=r"target must lie in \[0, 16\]"):
        gfl_ops.distribution_focal_loss(dfl_pred, dfl_target)


@pytest.mark.parametrize("bad_label", [-1, -7, 4, 5, 1000])
def test_qfl_labels_outside_classes_are_background(backend_device, bad_label):
    """mmdetection's convention on every backend: a label outside [0, C) (-1, C, > C) marks a
    background anchor, exactly as the label C does; no error."""
    backend, device = backend_device
    pred, (labels, scores) = _qfl_inputs()
    pred, labels, scores = pred.to(device), labels.to(device), scores.to(device)
    odd = labels.clone()
    odd[::2] = bad_label
    background = labels.clone()
    background[::2] = C
    got = gfl_ops.quality_focal_loss(pred, (odd, scores), reduction="none", backend=backend)
    want = gfl_ops.quality_focal_loss(pred, (background, scores), reduction="none", backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
