"""Every backend computes the stable forms of docs/math.md, observed from outside.

Inputs where the textbook formulas lose their digits in float32, each backend's value and
gradient compared with the exact result:

* **Integral**: rows with nearly all the mass on one bin (logits 0, and +40 or +80 on the bin(s)
  holding the mass: one bin at 0, 1, the middle, n - 1 or n; two- and three-bin ties; a unique
  maximum with a runner-up that pulls ŷ half a bin or more off it).  ``j − ŷ`` formed directly
  cancels at the bin holding the mass (the whole gradient entry is lost: relative error 1); the
  pivoted form ``(j − p) − (ŷ − p)`` keeps it.
* **QFL**: logits ±20 … ±80 with targets 0 / 1, where ``log(1 + exp(x))`` and ``σ − y`` round
  to 0 without ``log1p(exp(−|x|))`` and the ``e = exp(−|x|)`` forms of ``σ − y`` and ``σ(1 − σ)``.
* **DFL**: one bin dominating by 100 or 150, where ``log softmax`` underflows (and an unshifted
  softmax overflows) without the row max as the shift of the log-sum-exp.

The exact values are the textbook formulas evaluated in 80-digit decimal arithmetic on the
float32 inputs (Python's :mod:`decimal`; a float converts to Decimal exactly), not
:mod:`gfl_ops.reference` in float64: the reference follows mmdetection op for op, and even in
float64 it loses these entries (17 bins, +40 on bin 5: the gradient at bin 5 is 0 instead of
−2.2e-16; QFL at x = −40, y = 0 is 0 instead of 4.2e-18, at x = −30 it is 1.3 %
off, through ``binary_cross_entropy_with_logits``).

Errors are in units of ``EPS`` = float32's machine epsilon (2^-23).  The integral's gradient
error is measured against its condition ``S_j · Σ_k S_k |k − j|`` (``|g_j|`` itself where ``j``
is far from ŷ, larger where ``j − ŷ`` is intrinsically ill-conditioned, e.g. where ŷ falls on
bin ``j`` between two tied bins and the exact entry is 0 to working precision): a rounding
error of ŷ (or of ŷ − p) enters ``S_j (j − ŷ)`` scaled by about that.  Each tolerance is 2 to 3
times the largest error measured on these inputs (CPU kernel and Triton interpreter, recompute
and fused gradients, scaled by an upstream gradient); each negative control computes the naive
form in float32 in the test and asserts that it misses the tolerance by orders of magnitude
(measured margins in its docstring).

The ``reference`` backend (the Softmax + MatMul and BCE formulas, in float32 here) is the naive
form by design and is expected to fail the integral's gradient and QFL (``xfail(strict=True)``:
if it starts passing, this file and docs/math.md need updating); its integral value and DFL pass.
The checks run on CPU tensors (the backends available on CPU: ``cpu``, and ``triton`` under
``TRITON_INTERPRET=1``, which tests/conftest.py sets when there is no GPU); the compiled GPU
kernels have other ``exp``/``rcp`` roundings and are not measured here.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch

import gfl_ops
from gfl_ops import _cpp_backend

EPS = torch.finfo(torch.float32).eps
TINY = torch.finfo(torch.float32).tiny  # smallest normal float32

# Tolerances, in EPS (the largest error measured on these inputs, over both gradient strategies
# and the upstream scaling, in the comment: cpu / triton interpreter / reference backend).
INTEGRAL_VALUE_TOL = 3.0  # relative: 1.11 / 0.69 / 0.69
INTEGRAL_GRAD_TOL = 4.0  # of the condition S_j Σ_k S_k |k − j|: 1.33 / 1.33 / (8.4e6)
INTEGRAL_AGREE_TOL = 5.0  # |Triton − C++|, same units: 2.34
# relative; β = 0.5 is exp2((β − 1)·log2|d|) in Triton, |d| ~ e^−30: the rounding of the
# exponent (~22) is amplified (C++ takes exp(β·log|d|): 0.98)
QFL_TOL = {0.0: 4.0, 1.0: 4.0, 2.0: 4.0, 0.5: 16.0}  # 0.94, 0.94, 1.6, 0.98 / 0.50, 0.32, 1.41, 5.6
DFL_LOSS_TOL = 2.0  # relative: 0 / 0 / 0 (the loss is the height, exactly)
DFL_GRAD_TOL = 4.0  # relative, above the smallest normal float32: 1.36 / 1.36 / 1.45

BACKENDS = (
    "cpu",
    "triton",
    pytest.param(
        "reference",
        marks=pytest.mark.xfail(
            strict=True,
            reason="the reference backend is the naive textbook form (mmdetection op for op)",
        ),
    ),
)
BACKENDS_ALL_PASS = ("cpu", "triton", "reference")


def _require(backend: str) -> None:
    if backend not in gfl_ops.available_backends("cpu"):
        pytest.skip(f"{backend}: {gfl_ops.backend_status('cpu')}")


@pytest.fixture(params=["recompute", "fused"])
def strategy(request, monkeypatch) -> str:
    """Both gradient strategies, for the C++ backend and (when importable) the Triton one."""
    fused = request.param == "fused"
    monkeypatch.setitem(_cpp_backend.FUSED_GRAD, "cpu", fused)
    try:
        from gfl_ops.triton import _common
    except ImportError:
        pass
    else:
        monkeypatch.setattr(_common, "FUSED_GRAD", fused)
    return request.param


def _upstream(m: int) -> torch.Tensor:
    """Per-row upstream gradients: the gradient scaling is part of the computation checked."""
    return torch.tensor([1.0, -2.0, 0.375, 3.0] * m)[:m]


def _value_and_grad(fn, pred: torch.Tensor, upstream: torch.Tensor):
    leaf = pred.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf, upstream.to(out.dtype))
    return out.detach().double(), grad.double()


def _dec(v) -> Decimal:
    return Decimal(float(v))  # exact: every binary float is a finite decimal


def _worst(err: torch.Tensor, scale: torch.Tensor) -> float:
    """max(err / scale) in EPS; inf where err is not finite."""
    ratio = err / scale
    return float(torch.where(torch.isfinite(err), ratio, math.inf).max()) / EPS


# ----------------------------------------------------------------------------------------------
# Integral
# ----------------------------------------------------------------------------------------------

INTEGRAL_BINS = (5, 17, 33)
INTEGRAL_HEIGHTS = (40.0, 80.0)


def _peaked_rows(bins: int) -> torch.Tensor:
    """Logits 0, and +40 / +80 on the bins that hold the mass (float32)."""
    n = bins - 1
    masses = [[0], [1], [n // 2], [n - 1], [n], [0, n], [1, n - 1], [2, 3], [0, 1, n]]
    rows = []
    for h in INTEGRAL_HEIGHTS:
        for bins_up in masses:
            z = torch.zeros(bins)
            z[bins_up] = h
            rows.append(z)
        if bins > 12:
            # unique argmax at 2, runner-up at 12: ŷ is 2.5 to 5.8 (the pivot stays at 2)
            for gap in (0.5, 1.0, 3.0):
                z = torch.zeros(bins)
                z[2], z[12] = h, h - gap
                rows.append(z)
    return torch.stack(rows)


def _integral_exact(pred: torch.Tensor):
    """(ŷ (M,), dŷ/dz (M, B), condition S_j Σ_k S_k |k − j| (M, B)) in float64 from 80 digits."""
    values, grads, conds = [], [], []
    with localcontext() as ctx:
        ctx.prec = 80
        for row in pred.tolist():
            z = [_dec(v) for v in row]
            top = max(z)
            e = [(v - top).exp() for v in z]
            total = sum(e)
            s = [v / total for v in e]
            y = sum(s_j * j for j, s_j in enumerate(s))
            values.append(float(y))
            grads.append([float(s_j * (j - y)) for j, s_j in enumerate(s)])
            conds.append(
                [
                    float(s_j * sum(s_k * abs(k - j) for k, s_k in enumerate(s)))
                    for j, s_j in enumerate(s)
                ]
            )
    as64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return as64(values), as64(grads), as64(conds)


def _naive_integral(pred: torch.Tensor):
    """The textbook form in float32: ŷ = Σ S_j j and dŷ/dz_j = S_j (j − ŷ), no pivot."""
    s = torch.softmax(pred, dim=1)
    j = torch.arange(pred.shape[1], dtype=pred.dtype)
    y = (s * j).sum(dim=1)
    return y, s * (j - y[:, None])


@pytest.mark.parametrize("bins", INTEGRAL_BINS)
@pytest.mark.parametrize("backend", BACKENDS_ALL_PASS)
def test_integral_value_on_peaked_rows(backend, bins):
    _require(backend)
    pred = _peaked_rows(bins)
    value, _, _ = _integral_exact(pred)
    out = gfl_ops.integral(pred, backend=backend).double()
    worst = _worst((out - value).abs(), value.abs())
    assert worst <= INTEGRAL_VALUE_TOL, f"{backend}: value off by {worst:.2f} EPS relative"


@pytest.mark.parametrize("bins", INTEGRAL_BINS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_integral_gradient_on_peaked_rows(backend, bins, strategy):
    _require(backend)
    pred = _peaked_rows(bins)
    _, grad, cond = _integral_exact(pred)
    up = _upstream(pred.shape[0])
    _, got = _value_and_grad(lambda p: gfl_ops.integral(p, backend=backend), pred, up)
    up = up.double()[:, None]
    worst = _worst((got - up * grad).abs(), up.abs() * cond)
    assert worst <= INTEGRAL_GRAD_TOL, (
        f"{backend}: gradient off by {worst:.3g} EPS of its condition"
    )


@pytest.mark.parametrize("bins", INTEGRAL_BINS)
def test_naive_integral_gradient_misses_the_bound(bins):
    """The negative control: j − ŷ formed directly in float32 loses the whole entry at the bin
    holding the mass (ŷ rounds to p): measured 8.4e6 EPS of the condition at worst and at least
    6.0e6 on every row checked one by one, where the bound is 4.  Rows whose mass sits on bin 0
    are fine either way (ŷ is tiny there and exact in relative terms), and split rows mostly
    too, so the one-by-one check covers the rows with all the mass on one other bin."""
    pred = _peaked_rows(bins)
    _, grad, cond = _integral_exact(pred)
    _, naive = _naive_integral(pred)
    per_row = ((naive.double() - grad).abs() / cond).amax(dim=1) / EPS
    assert float(per_row.max()) > 1e5 * INTEGRAL_GRAD_TOL, per_row
    # every row with its mass on one bin other than 0 fails it, but the middle one: its tails are
    # symmetric, so the exact entry at the middle bin is 0 and the naive 0 is right
    p = pred.argmax(dim=1)
    one_bin = ((pred != 0).sum(dim=1) == 1) & (p > 0) & (p != (bins - 1) // 2)
    assert bool((per_row[one_bin] > 1e5 * INTEGRAL_GRAD_TOL).all()), per_row[one_bin]


@pytest.mark.parametrize("bins", INTEGRAL_BINS)
def test_triton_integral_agrees_with_cpu(bins, strategy):
    """The Triton kernel against the C++ one directly (no oracle): they share the pivot (the
    argmax bin) and the FMA form of docs/math.md; the value agrees to 2 ulp (measured 2), the
    gradient to 5 EPS of its condition (measured 2.34).  Not bit for bit: on CPU the Triton
    interpreter's exp is numpy's and its fma two roundings, the C++ sums run in bin order where
    tl.sum is a tree, and a tie may resolve to another bin on the C++ side (either is allowed
    there).  The old Triton pivot (the mean rounded to a bin) met the same bounds: it coincides
    with the argmax wherever the mass sits on one bin, and elsewhere both pivots are exact
    integers near the mass; this pins the agreement, not the pivot."""
    _require("cpu")
    _require("triton")
    pred = _peaked_rows(bins)
    _, _, cond = _integral_exact(pred)
    up = _upstream(pred.shape[0])
    out_c, grad_c = _value_and_grad(lambda p: gfl_ops.integral(p, backend="cpu"), pred, up)
    out_t, grad_t = _value_and_grad(lambda p: gfl_ops.integral(p, backend="triton"), pred, up)
    c32 = out_c.float()
    ulp = (torch.nextafter(c32, torch.tensor(math.inf)) - c32).double()  # float32 ulp (ŷ >= 0)
    assert bool(((out_t - out_c).abs() <= 2 * ulp).all()), (out_t - out_c) / ulp
    worst = _worst((grad_t - grad_c).abs(), up.double().abs()[:, None] * cond)
    assert worst <= INTEGRAL_AGREE_TOL, f"Triton vs C++: {worst:.3g} EPS of the condition"


# ----------------------------------------------------------------------------------------------
# QFL
# ----------------------------------------------------------------------------------------------

# β -> |x| values: the loss ~ exp(-|x| (1 + β)) stays a normal float32 (above 1.2e-38)
QFL_CASES = {
    0.0: (30.0, 40.0, 60.0, 80.0),
    1.0: (30.0, 40.0),
    2.0: (20.0, 25.0),
    0.5: (30.0, 40.0, 50.0),
}
QFL_CLASSES = 19  # a full SIMD vector (8 or 16 lanes) and a scalar tail on the CPU
QFL_POSITIVE = 5


def _qfl_inputs(beta: float):
    """Rows of 19 classes for each |x|: class 5 the positive (logit +|x|, target 1), the others
    negatives (logit −|x|, target 0).  By symmetry (L(x, 1) = L(−x, 0)) all 19 have the same
    loss, about e^(−|x|·(1 + β))."""
    mags = torch.tensor(QFL_CASES[beta])
    pred = -mags[:, None].expand(-1, QFL_CLASSES).clone()
    pred[:, QFL_POSITIVE] = mags
    target = torch.zeros_like(pred)
    target[:, QFL_POSITIVE] = 1.0
    return pred, target


def _qfl_exact(pred: torch.Tensor, target: torch.Tensor, beta: float):
    """(per-row loss (N,), dL/dx (N, C)) in float64 from the textbook formulas in 80 digits:
    σ = 1/(1 + e^−x), BCE = log(1 + e^x) − x y, L = |σ − y|^β BCE."""
    losses, grads = [], []
    with localcontext() as ctx:
        ctx.prec = 80
        b = _dec(beta)
        for xs, ys in zip(pred.tolist(), target.tolist()):
            row_loss, row_grad = Decimal(0), []
            for xv, yv in zip(xs, ys):
                x, y = _dec(xv), _dec(yv)
                sig = 1 / (1 + (-x).exp())
                bce = (1 + x.exp()).ln() - x * y
                d = sig - y
                if beta == 0.0:
                    m, dm = Decimal(1), Decimal(0)
                else:
                    m = abs(d) ** b
                    dm = b * abs(d) ** (b - 1) * (1 if d > 0 else -1)
                row_loss += m * bce
                row_grad.append(float(dm * sig * (1 - sig) * bce + m * d))
            losses.append(float(row_loss))
            grads.append(row_grad)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


def _naive_qfl(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """The textbook form in float32: log(1 + exp(x)) and σ − y from σ = sigmoid(x)."""
    sig = torch.sigmoid(pred)
    bce = torch.log(1 + torch.exp(pred)) - pred * target
    return ((sig - target).abs() ** beta * bce).sum(dim=1)


def _qfl_call(backend: str, form: str, beta: float):
    def call(p, target):
        tgt = target
        if form == "labels":
            tgt = (torch.full((p.shape[0],), QFL_POSITIVE), torch.ones(p.shape[0]))
        return gfl_ops.quality_focal_loss(p, tgt, reduction="none", beta=beta, backend=backend)

    return call


@pytest.mark.parametrize("beta", list(QFL_CASES))
@pytest.mark.parametrize("form", ["dense", "labels"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_qfl_at_large_logits(backend, form, beta, strategy):
    _require(backend)
    pred, target = _qfl_inputs(beta)
    loss, grad = _qfl_exact(pred, target, beta)
    up = _upstream(pred.shape[0])
    call = _qfl_call(backend, form, beta)
    got_loss, got_grad = _value_and_grad(lambda p: call(p, target), pred, up)
    up = up.double()
    worst_loss = _worst((got_loss - loss).abs(), loss.abs())
    worst_grad = _worst((got_grad - up[:, None] * grad).abs(), (up[:, None] * grad).abs())
    tol = QFL_TOL[beta]
    assert worst_loss <= tol, f"{backend} {form} beta={beta}: loss off by {worst_loss:.3g} EPS"
    assert worst_grad <= tol, f"{backend} {form} beta={beta}: gradient off by {worst_grad:.3g} EPS"


@pytest.mark.parametrize("beta", list(QFL_CASES))
def test_naive_qfl_misses_the_bound(beta):
    """The negative control: log(1 + exp(x)) rounds to 0 from x ≈ −17 down and σ − 1 to 0
    from x ≈ 17 up in float32, so the naive loss and gradient are 0 here (relative error 1 =
    8.4e6 EPS, or NaN: 0 · ∞ in |d|^(β − 1) at β = 0.5; the bounds are 4 and 16)."""
    pred, target = _qfl_inputs(beta)
    loss, grad = _qfl_exact(pred, target, beta)
    leaf = pred.clone().requires_grad_(True)
    naive = _naive_qfl(leaf, target, beta)
    (naive_grad,) = torch.autograd.grad(naive.sum(), leaf)
    worst_loss = _worst((naive.detach().double() - loss).abs(), loss.abs())
    worst_grad = _worst((naive_grad.double() - grad).abs(), grad.abs())
    assert worst_loss > 1e5 * QFL_TOL[beta], worst_loss
    assert worst_grad > 1e5 * QFL_TOL[beta], worst_grad


# ----------------------------------------------------------------------------------------------
# DFL
# ----------------------------------------------------------------------------------------------

DFL_BINS = 17


def _dfl_inputs():
    """Logits 0 and one bin at +100 / +150 (bin 0, 8 or 16), targets away from it: the loss is
    ≈ the height, log S of the target bins underflows in float32.  (A target whose two bins put
    weight 1 on the dominant bin has a loss of n·e^−100, below float32's resolution of log Σ
    around 1: no backend resolves it, docs/math.md does not promise it, so it is left out.)"""
    n = DFL_BINS - 1
    rows, targets = [], []
    for h in (100.0, 150.0):
        for p in (0, n // 2, n):
            for y in (0.0, 3.25, n / 2, n / 2 + 0.5, n - 0.5, float(n)):
                if y == p:
                    continue
                z = torch.zeros(DFL_BINS)
                z[p] = h
                rows.append(z)
                targets.append(y)
    return torch.stack(rows), torch.tensor(targets)


def _dfl_exact(pred: torch.Tensor, target: torch.Tensor):
    """(loss (M,), dL/dz (M, B)) in float64 from 80 digits: L = −Σ w log S, dL/dz = S − w."""
    n = pred.shape[1] - 1
    losses, grads = [], []
    with localcontext() as ctx:
        ctx.prec = 80
        for row, yv in zip(pred.tolist(), target.tolist()):
            z = [_dec(v) for v in row]
            lse = sum(v.exp() for v in z).ln()
            y = _dec(yv)
            left = min(int(yv), n - 1)
            w = [Decimal(0)] * (n + 1)
            w[left], w[left + 1] = left + 1 - y, y - left
            losses.append(float(sum(w_j * (lse - z_j) for w_j, z_j in zip(w, z))))
            grads.append([float((z_j - lse).exp() - w_j) for w_j, z_j in zip(w, z)])
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS_ALL_PASS)
def test_dfl_with_a_dominant_bin(backend, strategy):
    _require(backend)
    pred, target = _dfl_inputs()
    loss, grad = _dfl_exact(pred, target)
    up = _upstream(pred.shape[0])
    got_loss, got_grad = _value_and_grad(
        lambda p: gfl_ops.distribution_focal_loss(p, target, reduction="none", backend=backend),
        pred,
        up,
    )
    up = up.double()[:, None]
    worst_loss = _worst((got_loss - loss).abs(), loss.abs())
    # entries below the smallest normal float32 (e^−100 = 3.7e-44) may flush or round anyhow
    worst_grad = _worst((got_grad - up * grad).abs(), (up * grad).abs() + TINY)
    assert worst_loss <= DFL_LOSS_TOL, f"{backend}: loss off by {worst_loss:.3g} EPS"
    assert worst_grad <= DFL_GRAD_TOL, f"{backend}: gradient off by {worst_grad:.3g} EPS"


def test_naive_dfl_misses_the_bound():
    """The negative controls: −Σ w log(softmax) in float32 (S of the target bins is subnormal at
    +100, 0 at +150: measured 1.4e3 EPS, then inf) and the unshifted softmax exp(z) / Σ exp(z)
    for the gradient (exp(100) overflows: NaN)."""
    pred, target = _dfl_inputs()
    loss, grad = _dfl_exact(pred, target)
    n = pred.shape[1] - 1
    left = target.floor().clamp(max=n - 1).long()
    w_left, w_right = (left + 1) - target, target - left
    log_s = torch.log(torch.softmax(pred, dim=1))
    rows = torch.arange(pred.shape[0])
    naive = -(w_left * log_s[rows, left] + w_right * log_s[rows, left + 1])
    err = (naive.double() - loss).abs()
    at_100 = pred.amax(dim=1) == 100.0
    assert _worst(err[at_100], loss[at_100].abs()) > 500 * DFL_LOSS_TOL
    assert _worst(err[~at_100], loss[~at_100].abs()) == math.inf
    s = torch.exp(pred) / torch.exp(pred).sum(dim=1, keepdim=True)
    naive_grad = s.clone()
    naive_grad[rows, left] -= w_left
    naive_grad[rows, left + 1] -= w_right
    assert _worst((naive_grad.double() - grad).abs(), grad.abs() + TINY) == math.inf
