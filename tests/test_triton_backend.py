"""Triton-specific tests of ``backend="triton"``.

They run on CUDA tensors when a GPU is present and otherwise on CPU tensors under Triton's
interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before triton is imported): in CI they
execute, they do not skip.  Sizes are kept small because the interpreter runs every program in
Python.

Covered here: block heuristics for the sizes the detector uses (C in {1, 20, 80, 365, 1203},
n+1 in {8, 17, 33}) run and agree with the float64 reference; int64 row offsets; no writes into
the caller's tensors; ``torch.library.opcheck`` of every operator; ``torch.compile(fullgraph=True)``
over forward and backward; bitwise determinism; both gradient strategies (recompute / fused);
strided, expanded and empty inputs; and hypothesis agreement with :mod:`gfl_ops.reference`.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gfl_ops
from gfl_ops import reference

try:
    import gfl_ops.triton as triton_backend
except ImportError as exc:  # no triton, or a torch without torch.library.custom_op (< 2.4)
    pytest.skip(f"the triton backend cannot be imported: {exc}", allow_module_level=True)
from gfl_ops.triton import _common, dfl, integral, qfl  # noqa: E402

ops = torch.ops.gfl_ops

if torch.cuda.is_available() and triton_backend.BACKEND.unavailable_reason("cuda") is None:
    DEVICE = "cuda"
else:
    DEVICE = "cpu"

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) against the float64 reference on the same rounded inputs (tests/gfl_testing.py).
LOSS_TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
}
GRAD_TOL = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 2e-5),
    torch.bfloat16: (1.6e-2, 1e-4),
}
INTEGRAL_TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.fixture(params=[False, True], ids=["recompute", "fused"])
def fused(request, monkeypatch) -> bool:
    """Run a test under both gradient strategies."""
    monkeypatch.setattr(_common, "FUSED_GRAD", request.param)
    return request.param


@contextlib.contextmanager
def _gradient_mode(fused: bool):
    """``FUSED_GRAD`` set for a block (hypothesis tests cannot use the fixture per example)."""
    saved = _common.FUSED_GRAD
    _common.FUSED_GRAD = fused
    try:
        yield
    finally:
        _common.FUSED_GRAD = saved


def _close(actual, expected, tol, what=""):
    rtol, atol = tol
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.detach().double().cpu(),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def _value_and_grad(fn, leaf, upstream):
    """(fn(leaf), d<fn(leaf), upstream>/dleaf) on a fresh copy of ``leaf``."""
    leaf = leaf.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf, upstream.to(out.dtype))
    return out.detach(), grad


def _compare(ours, ref, leaf, n_rows, loss_tol, grad_tol, what, seed=0, subgradient=False):
    """Compare ``ours(leaf)`` with ``ref(leaf in float64 on the CPU)``: value and gradient under
    a random per-row upstream gradient (which exercises the gradient scaling).

    ``subgradient``: where autograd through the reference gives NaN for a finite loss (QFL at
    σ = y exactly with β < 1: 0·∞ in ``|d|.pow(β)``), expect the subgradient 0 of
    docs/math.md, "Quality Focal Loss"."""
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.rand(n_rows, generator=gen, dtype=torch.float64) + 0.5
    out, grad = _value_and_grad(ours, leaf, upstream.to(leaf.device))
    ref_out, ref_grad = _value_and_grad(ref, leaf.detach().double().cpu(), upstream)
    if subgradient and torch.isfinite(ref_out).all():
        ref_grad = torch.nan_to_num(ref_grad, nan=0.0)
    assert grad.dtype == leaf.dtype, f"{what}: gradient dtype {grad.dtype} != {leaf.dtype}"
    _close(out, ref_out, loss_tol, f"{what} value")
    _close(grad, ref_grad, grad_tol, f"{what} gradient")
    return out, grad


def _expected_loss_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------


def test_triton_backend_runs_here():
    """In CI (no GPU) the backend must be available on CPU tensors through the interpreter."""
    assert "triton" in gfl_ops.available_backends(DEVICE), gfl_ops.backend_status(DEVICE)
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert _common.is_interpreted()


def test_unavailable_reasons(monkeypatch):
    backend = triton_backend.BACKEND
    assert backend.name == "triton"
    assert "mps" in backend.unavailable_reason("mps")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason("cpu")
    if not torch.cuda.is_available():
        assert "CUDA" in backend.unavailable_reason("cuda")


def test_too_old_triton_is_refused_with_a_reason(monkeypatch):
    """Under Triton 3.0 (torch 2.4) the kernels gave wrong values: the backend says it cannot
    run there, on every device, and the automatic choice takes another."""
    import triton

    from gfl_ops import _registry

    # the check is cached per process (the installed Triton does not change): clear it around
    # each pretended version
    check = triton_backend._triton_too_old
    monkeypatch.setattr(triton, "__version__", "3.0.0")
    check.cache_clear()
    for device_type in ("cpu", "cuda"):
        reason = triton_backend.BACKEND.unavailable_reason(device_type)
        assert "Triton 3.0.0 is older than 3.2" in reason
    assert "triton" not in _registry.available_backends("cpu")
    with pytest.raises(RuntimeError, match="Triton 3.0.0 is older than 3.2"):
        gfl_ops.integral(torch.randn(3, 17), backend="triton")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    check.cache_clear()
    assert triton_backend.BACKEND.unavailable_reason(DEVICE) is None
    monkeypatch.undo()
    check.cache_clear()


# ----------------------------------------------------------------------------------------------
# Launch heuristics at the sizes that matter, and correctness there
# ----------------------------------------------------------------------------------------------

QFL_SIZES = {1: 1, 20: 32, 80: 16, 365: 128, 1203: 256}  # C -> expected columns per step
BIN_SIZES = {8: 8, 17: 32, 33: 64}  # n+1 -> expected block width


@pytest.mark.parametrize("num_classes", sorted(QFL_SIZES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qfl_config_covers_detector_sizes(num_classes, dtype):
    cfg = qfl.qfl_config(100_000, num_classes, dtype)
    assert cfg.block_cols == QFL_SIZES[num_classes]
    assert cfg.block_cols & (cfg.block_cols - 1) == 0 and cfg.block_rows & (cfg.block_rows - 1) == 0
    steps = -(-num_classes // cfg.block_cols)
    padding = steps * cfg.block_cols - num_classes
    # at most 12.5 % padded columns, except the single power-of-two step of a small C
    assert padding * 8 <= num_classes or steps == 1
    assert cfg.block_rows * cfg.block_cols == _common.tile_elements(dtype)
    assert cfg.num_warps in (4, 8, 16)
    # small problems do not get more rows per program than they have
    assert qfl.qfl_config(3, num_classes, dtype).block_rows <= 4


@pytest.mark.parametrize("num_bins", sorted(BIN_SIZES))
def test_bins_config_covers_detector_sizes(num_bins):
    cfg = dfl.bins_config(100_000, num_bins, torch.float32)
    assert cfg.block_cols == BIN_SIZES[num_bins] >= num_bins
    assert cfg.block_rows * cfg.block_cols == _common.TILE_ELEMENTS
    assert cfg.grid(100_000) == (-(-100_000 // cfg.block_rows),)


def test_beta_specialisations():
    assert [qfl.beta_mode(b) for b in (0.0, 1.0, 2.0, 0.5, 2.5)] == [
        qfl.BETA_ZERO,
        qfl.BETA_ONE,
        qfl.BETA_TWO,
        qfl.BETA_GENERAL,
        qfl.BETA_GENERAL,
    ]


@pytest.mark.parametrize("num_classes", sorted(QFL_SIZES))
@pytest.mark.parametrize("dense", [False, True], ids=["labels", "dense"])
def test_qfl_at_detector_sizes(num_classes, dense, fused):
    """Several programs and a ragged last row block (N = rows per program + 3)."""
    dtype = torch.float32
    n = qfl.qfl_config(10**6, num_classes, dtype).block_rows + 3
    gen = torch.Generator().manual_seed(num_classes)
    leaf = (torch.randn(n, num_classes, generator=gen) * 3).to(DEVICE, dtype)
    labels = torch.randint(0, num_classes + 1, (n,), generator=gen).to(DEVICE)
    scores = torch.rand(n, generator=gen).to(DEVICE)
    if dense:
        target = torch.zeros(n, num_classes)
        rows = torch.nonzero(labels.cpu() < num_classes).squeeze(1)
        target[rows, labels.cpu()[rows]] = scores.cpu()[rows]
        target = target.to(DEVICE)
        _compare(
            lambda p: gfl_ops.quality_focal_loss(p, target, reduction="none", backend="triton"),
            lambda p: reference.quality_focal_loss_dense(p, target.double().cpu()),
            leaf,
            n,
            LOSS_TOL[dtype],
            GRAD_TOL[dtype],
            f"qfl dense C={num_classes}",
        )
    else:
        _compare(
            lambda p: gfl_ops.quality_focal_loss(
                p, (labels, scores), reduction="none", backend="triton"
            ),
            lambda p: reference.quality_focal_loss(p, labels.cpu(), scores.double().cpu()),
            leaf,
            n,
            LOSS_TOL[dtype],
            GRAD_TOL[dtype],
            f"qfl C={num_classes}",
        )


@pytest.mark.parametrize("num_bins", sorted(BIN_SIZES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dfl_and_integral_at_detector_sizes(num_bins, dtype, fused):
    m = dfl.bins_config(10**6, num_bins, dtype).block_rows + 3
    gen = torch.Generator().manual_seed(num_bins)
    leaf = (torch.randn(m, num_bins, generator=gen) * 2).to(DEVICE, dtype)
    target = torch.rand(m, generator=gen) * (num_bins - 1)
    target[:3] = torch.tensor([0.0, num_bins - 1.0, 1.0])  # both ends and an integer
    target = target.to(DEVICE)
    _compare(
        lambda p: gfl_ops.distribution_focal_loss(p, target, reduction="none", backend="triton"),
        lambda p: reference.distribution_focal_loss(p, target.double().cpu()),
        leaf,
        m,
        LOSS_TOL[dtype],
        GRAD_TOL[dtype],
        f"dfl n+1={num_bins}",
    )
    _compare(
        lambda p: gfl_ops.integral(p, backend="triton"),
        reference.integral,
        leaf,
        m,
        INTEGRAL_TOL[dtype],
        GRAD_TOL[dtype],
        f"integral n+1={num_bins}",
    )


# ----------------------------------------------------------------------------------------------
# int64 offsets
# ----------------------------------------------------------------------------------------------


def test_row_offsets_are_int64():
    """``row_ids`` (used by every kernel) yields int64 rows: row * stride past 2**31 is exact.

    A tensor that large does not fit a CI machine, so a probe kernel evaluates the same helper for
    a program id and stride whose product would wrap in int32 (the interpreter, like the GPU,
    wraps int32 arithmetic silently)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, pid, stride, BLOCK: tl.constexpr):
        rows = _common.row_ids(pid, BLOCK)
        tl.store(out_ptr + tl.arange(0, BLOCK), rows * stride)

    pid, stride, block = 3_000_000, 1203, 16
    out = torch.zeros(block, dtype=torch.int64, device=DEVICE)
    with _common.launch_guard(out):
        probe[(1,)](out, pid, stride, BLOCK=block)
    expected = torch.tensor([(pid * block + i) * stride for i in range(block)], dtype=torch.int64)
    assert expected.max() > 2**31
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize(
    "kernel",
    [qfl._qfl_kernel, dfl._dfl_kernel, integral._integral_kernel, _common._scale_rows_kernel],
)
def test_every_kernel_uses_int64_rows(kernel):
    source = inspect.getsource(kernel.fn)
    assert "row_ids(tl.program_id(0)" in source
    assert "tl.atomic" not in source  # deterministic: every output written by one program


# ----------------------------------------------------------------------------------------------
# Hypothesis: agreement with the float64 reference
# ----------------------------------------------------------------------------------------------

BETAS = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 4.0]) | st.floats(0.0, 4.0)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


def _make_pred(layout, rows, cols, gen, scale, dtype, probabilities=False):
    """(leaf, view): a contiguous leaf and the (rows, cols) view of it passed to the op.

    With ``probabilities`` the leaf holds sigmoid(logits) in [0.05, 0.95], rounded to ``dtype``
    (the fp16 gradient 1/(p(1-p)) of p near 0 or 1 would overflow), so both sides get the same p.
    """
    if layout == "transposed":
        leaf = torch.randn(cols, rows, generator=gen, dtype=torch.float64)
        view = lambda p: p.t()  # noqa: E731
    elif layout == "strided":
        leaf = torch.randn(rows, 2 * cols, generator=gen, dtype=torch.float64)
        view = lambda p: p[:, ::2]  # noqa: E731
    elif layout == "expanded":
        leaf = torch.randn(1, cols, generator=gen, dtype=torch.float64)
        view = lambda p: p.expand(rows, cols)  # noqa: E731
    else:
        leaf = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        view = lambda p: p  # noqa: E731
    leaf = leaf * scale
    if probabilities:
        leaf = leaf.sigmoid().clamp(0.05, 0.95)
    return leaf.to(DEVICE, dtype), view


@st.composite
def qfl_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    layouts = LAYOUTS if dtype in (torch.float32, torch.float64) else LAYOUTS[:3]
    return dict(
        n=draw(st.integers(0, 9)),
        c=draw(st.sampled_from([1, 2, 3, 7, 20, 33, 80])),
        dtype=dtype,
        beta=draw(BETAS),
        activated=draw(st.booleans()),
        dense=draw(st.booleans()),
        layout=draw(st.sampled_from(layouts)),
        scale=draw(st.sampled_from([0.5, 3.0, 20.0])),
        label_dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.uint8])),
        seed=draw(st.integers(0, 2**31 - 1)),
        fused=draw(st.booleans()),
    )


@given(case=qfl_cases())
def test_qfl_matches_reference(case):
    n, c, dtype = case["n"], case["c"], case["dtype"]
    beta, activated = case["beta"], case["activated"]
    gen = torch.Generator().manual_seed(case["seed"])
    leaf, view = _make_pred(case["layout"], n, c, gen, case["scale"], dtype, activated)
    # labels include background (c); values outside [0, c] are refused by the public API and
    # covered at the backend level by test_qfl_labels_outside_range_are_background
    labels = torch.randint(0, c + 1, (n,), generator=gen).to(case["label_dtype"])
    scores = torch.rand(2 * n, generator=gen)[::2]  # strided
    kw = dict(beta=beta, activated=activated, reduction="none")
    if case["dense"]:
        target = torch.rand(n, c, generator=gen) * (torch.rand(n, c, generator=gen) < 0.3)
        ours = lambda p: gfl_ops.quality_focal_loss(  # noqa: E731
            view(p),
            target.to(DEVICE),
            **kw,
            backend="triton",
        )
        ref = lambda p: reference.quality_focal_loss_dense(  # noqa: E731
            view(p),
            target.double(),
            beta,
            activated,
        )
    else:
        ours = lambda p: gfl_ops.quality_focal_loss(  # noqa: E731
            view(p), (labels.to(DEVICE), scores.to(DEVICE)), **kw, backend="triton"
        )
        ref = lambda p: reference.quality_focal_loss(  # noqa: E731
            view(p),
            labels.long(),
            scores.double(),
            beta,
            activated,
        )
    with _gradient_mode(case["fused"]):
        out, _ = _compare(
            ours,
            ref,
            leaf,
            n,
            LOSS_TOL[dtype],
            GRAD_TOL[dtype],
            str(case),
            seed=case["seed"],
            subgradient=True,
        )
    assert out.shape == (n,) and out.dtype == _expected_loss_dtype(dtype)


@st.composite
def bin_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    layouts = LAYOUTS if dtype in (torch.float32, torch.float64) else LAYOUTS[:3]
    return dict(
        m=draw(st.integers(0, 9)),
        bins=draw(st.sampled_from([2, 3, 8, 17, 33])),
        dtype=dtype,
        layout=draw(st.sampled_from(layouts)),
        scale=draw(st.sampled_from([0.5, 3.0, 20.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        fused=draw(st.booleans()),
    )


@given(case=bin_cases())
def test_dfl_matches_reference(case):
    m, bins, dtype = case["m"], case["bins"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    leaf, view = _make_pred(case["layout"], m, bins, gen, case["scale"], dtype)
    n = bins - 1
    target = torch.rand(m, generator=gen, dtype=torch.float64) * n
    # exact bin values, including both ends, are the edge cases of the floor / clamp logic
    exact = torch.randint(0, n + 1, (m,), generator=gen).double()
    target = torch.where(torch.rand(m, generator=gen) < 0.3, exact, target).float()
    with _gradient_mode(case["fused"]):
        out, _ = _compare(
            lambda p: gfl_ops.distribution_focal_loss(
                view(p), target.to(DEVICE), reduction="none", backend="triton"
            ),
            lambda p: reference.distribution_focal_loss(view(p), target.double()),
            leaf,
            m,
            LOSS_TOL[dtype],
            GRAD_TOL[dtype],
            str(case),
            seed=case["seed"],
        )
    assert out.shape == (m,) and out.dtype == _expected_loss_dtype(dtype)


@given(case=bin_cases())
def test_integral_matches_reference(case):
    m, bins, dtype = case["m"], case["bins"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    leaf, view = _make_pred(case["layout"], m, bins, gen, case["scale"], dtype)
    with _gradient_mode(case["fused"]):
        out, _ = _compare(
            lambda p: gfl_ops.integral(view(p), backend="triton"),
            lambda p: reference.integral(view(p)),
            leaf,
            m,
            INTEGRAL_TOL[dtype],
            GRAD_TOL[dtype],
            str(case),
            seed=case["seed"],
        )
    assert out.shape == (m,) and out.dtype == dtype


# ----------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------


def test_empty_inputs(fused):
    """N = 0, C = 0, M = 0: no kernel launch, right shapes and dtypes, zero gradients."""
    for n, c in ((0, 5), (0, 0), (4, 0)):
        pred = torch.zeros(n, c, device=DEVICE, dtype=torch.float16, requires_grad=True)
        labels = torch.zeros(n, dtype=torch.long, device=DEVICE)
        scores = torch.zeros(n, device=DEVICE)
        loss = triton_backend.BACKEND.qfl(pred, labels, scores, 2.0, False)
        assert loss.shape == (n,) and loss.dtype == torch.float32
        assert torch.equal(loss.cpu(), torch.zeros(n))
        loss.sum().backward()
        assert pred.grad.shape == (n, c)
        dense = triton_backend.BACKEND.qfl_dense(pred.detach(), pred.detach(), 2.0, True)
        assert dense.shape == (n,)
    pred = torch.zeros(0, 17, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, device=DEVICE)
    assert gfl_ops.distribution_focal_loss(pred, target, backend="triton").item() == 0.0
    out = gfl_ops.integral(pred, backend="triton")
    out.sum().backward()
    assert out.shape == (0,) and pred.grad.shape == (0, 17)


def test_dfl_target_clamped_and_nan_rows(fused):
    """Out-of-range targets clamp to [0, n] in the kernel; a NaN target gives a NaN loss and
    NaN gradients in bins 0 and 1 (its split, as the CPU and CUDA kernels')."""
    pred = torch.randn(5, 9, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([-3.0, 0.0, 8.0, 11.0, float("nan")], device=DEVICE, dtype=torch.float64)
    loss = triton_backend.BACKEND.dfl(pred, target)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    clamped = torch.tensor([0.0, 0.0, 8.0, 8.0], dtype=torch.float64)
    ref = pred.detach().cpu()[:4].requires_grad_()
    ref_loss = reference.distribution_focal_loss(ref, clamped)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), ref)
    _close(loss[:4], ref_loss, LOSS_TOL[torch.float64], "clamped loss")
    _close(grad[:4], ref_grad, GRAD_TOL[torch.float64], "clamped grad")
    assert torch.isnan(loss[4]) and torch.isnan(grad[4]).nonzero().flatten().tolist() == [0, 1]
    # target = n exactly: bins (n-1, n) with weights (0, 1), finite
    assert torch.isfinite(loss[:4]).all()


@pytest.mark.parametrize(
    "dtype,magnitude",
    [(torch.float32, 1e4), (torch.float16, 60.0), (torch.bfloat16, 1e4), (torch.float64, 1e4)],
)
def test_extreme_logits_are_finite_and_accurate(dtype, magnitude, fused):
    values = torch.tensor([-magnitude, -1.0, 0.0, 1.0, magnitude], dtype=torch.float64)
    pred = values.repeat(4, 1).to(DEVICE, dtype)
    labels = torch.tensor([0, 4, 2, 5], device=DEVICE)  # 5 = background
    scores = torch.tensor([0.0, 1.0, 0.5, 0.3], device=DEVICE)
    out, grad = _compare(
        lambda p: gfl_ops.quality_focal_loss(
            p, (labels, scores), reduction="none", backend="triton"
        ),
        lambda p: reference.quality_focal_loss(p, labels.cpu(), scores.double().cpu()),
        pred,
        4,
        LOSS_TOL[dtype],
        GRAD_TOL[dtype],
        f"qfl ±{magnitude}",
    )
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    z = values.repeat(3, 2)[:, :9].to(DEVICE, dtype)
    target = torch.tensor([0.0, 4.5, 8.0], device=DEVICE)
    out, grad = _compare(
        lambda p: gfl_ops.distribution_focal_loss(p, target, reduction="none", backend="triton"),
        lambda p: reference.distribution_focal_loss(p, target.double().cpu()),
        z,
        3,
        LOSS_TOL[dtype],
        GRAD_TOL[dtype],
        f"dfl ±{magnitude}",
    )
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int8, torch.int16])
def test_qfl_labels_outside_range_are_background(label_dtype):
    """The backend contract (the public API rejects such labels on CPU before the call): any
    label outside [0, C) marks a background anchor, whatever the integer dtype."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    labels = torch.tensor([-1, 5, 127, -128, 2, 0]).to(DEVICE, label_dtype)
    scores = torch.rand(6, generator=gen, dtype=torch.float64).to(DEVICE)
    ours = lambda p: triton_backend.BACKEND.qfl(p, labels, scores, 2.0, False)  # noqa: E731
    ref = lambda p: reference.quality_focal_loss(  # noqa: E731
        p,
        labels.long().cpu(),
        scores.cpu(),
        2.0,
    )
    _compare(ours, ref, x, 6, LOSS_TOL[torch.float64], GRAD_TOL[torch.float64], "labels")


def test_qfl_subgradient_zero_where_sigma_equals_target():
    """At σ = y the modulating factor's derivative term uses the subgradient 0 (β < 1 would be
    0·∞ in naive code); the loss and gradient stay finite and equal to the second term (0)."""
    pred = torch.tensor([[0.0, -800.0]], dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0], device=DEVICE)
    scores = torch.tensor([0.5], dtype=torch.float64, device=DEVICE)  # σ(0) = 0.5 = y
    for beta in (0.3, 1.0, 2.0):
        loss = triton_backend.BACKEND.qfl(pred, labels, scores, beta, False)
        (grad,) = torch.autograd.grad(loss.sum(), pred)
        assert torch.equal(grad.cpu(), torch.zeros(1, 2, dtype=torch.float64)), (beta, grad)
        assert loss.item() == 0.0


def test_gradcheck_float64(fused):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    labels = torch.tensor([0, 6, 3, 5], device=DEVICE)
    scores = torch.rand(4, generator=gen, dtype=torch.float64).to(DEVICE)
    dense = torch.rand(4, 6, generator=gen, dtype=torch.float64).to(DEVICE)
    z = torch.randn(3, 9, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.tensor([0.3, 4.0, 7.9], dtype=torch.float64, device=DEVICE)
    b = triton_backend.BACKEND
    gradcheck = torch.autograd.gradcheck
    for beta in (0.0, 0.7, 2.0):
        assert gradcheck(lambda p, beta=beta: b.qfl(p, labels, scores, beta, False), (x,))
        assert gradcheck(lambda p, beta=beta: b.qfl_dense(p, dense, beta, False), (x,))
        assert gradcheck(lambda p, beta=beta: b.qfl(p.sigmoid(), labels, scores, beta, True), (x,))
    assert torch.autograd.gradcheck(lambda p: b.dfl(p, t), (z,))
    assert torch.autograd.gradcheck(lambda p: b.integral(p), (z,))


@pytest.mark.parametrize("fused", [False, True])
def test_double_backward_is_exact(monkeypatch, fused):
    """Double backward used to raise; it is now exact on both gradient strategies (the fused
    path recomputes under create_graph: its saved gradient is a constant)."""
    monkeypatch.setattr(_common, "FUSED_GRAD", fused)
    b = triton_backend.BACKEND
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_(True)
    z = torch.randn(3, 6, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_(True)
    labels = torch.tensor([0, 1, 4], device=DEVICE)
    scores = torch.rand(3, dtype=torch.float64, generator=gen).to(DEVICE)
    dense = torch.rand(3, 4, dtype=torch.float64, generator=gen).to(DEVICE)
    t = torch.tensor([0.3, 2.5, 4.9], dtype=torch.float64, device=DEVICE)
    gradgradcheck = torch.autograd.gradgradcheck
    assert gradgradcheck(lambda p: b.qfl(p, labels, scores, 2.0, False), (x,))
    assert gradgradcheck(lambda p: b.qfl_dense(p, dense, 2.0, False), (x,))
    assert gradgradcheck(lambda p: b.dfl(p, t), (z,))
    assert gradgradcheck(lambda p: b.integral(p), (z,))


def test_unsupported_float_dtype_is_upcast():
    """float8 (no kernel path) is upcast to float32 before the call; autograd casts back."""
    x = torch.randn(3, 5, device=DEVICE).to(torch.float8_e4m3fn).requires_grad_()
    labels = torch.tensor([0, 5, 2], device=DEVICE)
    scores = torch.rand(3, device=DEVICE)
    loss = triton_backend.BACKEND.qfl(x, labels, scores, 2.0, False)
    expected = reference.quality_focal_loss(
        x.detach().double().cpu(), labels.cpu(), scores.double().cpu(), 2.0
    )
    assert loss.dtype == torch.float32
    _close(loss, expected, LOSS_TOL[torch.float32], "float8 qfl")
    loss.sum().backward()
    assert x.grad.dtype == torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------
# No writes into the caller's tensors; determinism
# ----------------------------------------------------------------------------------------------


def _all_ops_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(6, 7, generator=gen).to(DEVICE, dtype),
        labels=torch.tensor([0, 7, 3, 6, -1, 2], device=DEVICE),
        scores=torch.rand(6, generator=gen).to(DEVICE),
        target=torch.rand(6, 7, generator=gen).to(DEVICE),
        z=torch.randn(5, 17, generator=gen).to(DEVICE, dtype),
        t=(torch.rand(5, generator=gen) * 16).to(DEVICE),
        up6=torch.rand(6, generator=gen).to(DEVICE),
        up5=torch.rand(5, generator=gen).to(DEVICE, dtype),
    )


def _run_all_ops(inp):
    """Forward and backward of every op; returns every output and gradient."""
    b = triton_backend.BACKEND
    x = inp["x"].requires_grad_()
    z = inp["z"].requires_grad_()
    outs = [
        b.qfl(x, inp["labels"], inp["scores"], 2.0, False),
        b.qfl(x, inp["labels"], inp["scores"], 0.5, False),
        b.qfl_dense(x, inp["target"], 1.5, False),
        b.qfl(x.sigmoid(), inp["labels"], inp["scores"], 2.0, True),
        b.dfl(z, inp["t"]),
        b.integral(z),
    ]
    ups = [inp["up6"]] * 4 + [inp["up5"].float(), inp["up5"]]
    grads = torch.autograd.grad(outs, (x, z), [u.to(o.dtype) for o, u in zip(outs, ups)])
    x.requires_grad_(False)
    z.requires_grad_(False)
    return [o.detach() for o in outs] + list(grads)


def test_never_writes_into_caller_tensors(fused):
    inp = _all_ops_inputs()
    before = {k: (v.clone(), v._version) for k, v in inp.items()}
    results = _run_all_ops(inp)
    for k, v in inp.items():
        assert torch.equal(v, before[k][0]), f"{k} was modified"
        assert v._version == before[k][1], f"{k} was written in place"
    pointers = {v.data_ptr() for v in inp.values()}
    assert not any(r.data_ptr() in pointers for r in results if r.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype, fused):
    first = _run_all_ops(_all_ops_inputs(dtype))
    second = _run_all_ops(_all_ops_inputs(dtype))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fused_and_recompute_agree(monkeypatch):
    monkeypatch.setattr(_common, "FUSED_GRAD", False)
    recompute = _run_all_ops(_all_ops_inputs(torch.float64))
    monkeypatch.setattr(_common, "FUSED_GRAD", True)
    fused = _run_all_ops(_all_ops_inputs(torch.float64))
    for a, b in zip(recompute, fused):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# ----------------------------------------------------------------------------------------------


def _opcheck_cases():
    gen = torch.Generator().manual_seed(2)

    def r(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
        return t.requires_grad_(grad)

    def u(*shape, dtype=torch.float32, high=1.0):
        return (torch.rand(*shape, generator=gen) * high).to(DEVICE, dtype)

    labels = torch.tensor([0, 7, 3, -1, 6], device=DEVICE)
    labels32 = labels.to(torch.int32)
    cases = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = r(5, 7, dtype=dtype, grad=True)
        xt = r(7, 5, dtype=dtype).t().requires_grad_()  # non-contiguous
        p = u(5, 7, dtype=dtype).clamp(0.05, 0.95).requires_grad_()
        z = r(4, 17, dtype=dtype, grad=True)
        t = u(4, high=16.0)
        g5, g4 = u(5, dtype=_expected_loss_dtype(dtype)), u(4, dtype=_expected_loss_dtype(dtype))
        cases += [
            (ops.triton_qfl, (x, labels, u(5), 2.0, False, False)),
            (ops.triton_qfl, (xt, labels32, u(5), 0.3, False, False)),
            (ops.triton_qfl, (p, labels, u(5), 2.0, True, False)),
            (ops.triton_qfl, (x, labels, u(5), 1.5, False, True)),
            (ops.triton_qfl_backward, (g5, x.detach(), labels, u(5), 2.0, False)),
            (ops.triton_qfl_dense, (x, u(5, 7), 2.0, False, False)),
            (ops.triton_qfl_dense, (p, u(5, 7), 0.0, True, True)),
            (ops.triton_qfl_dense_backward, (g5, x.detach(), u(5, 7), 1.0, False)),
            (ops.triton_dfl, (z, t, False)),
            (ops.triton_dfl, (z, t, True)),
            (ops.triton_dfl_backward, (g4, z.detach(), t)),
            (ops.triton_integral, (z, False)),
            (ops.triton_integral, (z, True)),
            (ops.triton_integral_backward, (u(4, dtype=dtype), z.detach())),
            (ops.triton_scale_rows, (r(4, 17, dtype=dtype), g4)),
        ]
    return cases


OPCHECK_CASES = _opcheck_cases()
OPCHECK_IDS = [f"{str(op).split('.')[-1]}-{i}" for i, (op, _) in enumerate(OPCHECK_CASES)]


@pytest.mark.parametrize("op,args", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def _loss_step(x, labels, scores, z, t):
    qfl_loss = gfl_ops.quality_focal_loss(x, (labels, scores), avg_factor=3.0, backend="triton")
    dfl_loss = gfl_ops.distribution_focal_loss(z, t, backend="triton")
    decoded = gfl_ops.integral(z, backend="triton")
    return qfl_loss + 0.25 * dfl_loss + decoded.square().mean()


def test_compile_fullgraph_forward_backward(fused):
    """One graph, no breaks, for the three ops' forward and backward (with a reduction)."""
    gfl_ops.available_backends()  # load backends eagerly: compiled code must not import them
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen).to(DEVICE).requires_grad_()
    labels = torch.tensor([0, 5, 2, 4, 1, 5], device=DEVICE)
    scores = torch.rand(6, generator=gen).to(DEVICE)
    z = torch.randn(4, 8, generator=gen).to(DEVICE).requires_grad_()
    t = (torch.rand(4, generator=gen) * 7).to(DEVICE)

    torch._dynamo.reset()
    compiled = torch.compile(_loss_step, fullgraph=True)
    out = compiled(x, labels, scores, z, t)
    grads = torch.autograd.grad(out, (x, z))
    eager = _loss_step(x, labels, scores, z, t)
    eager_grads = torch.autograd.grad(eager, (x, z))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_bfloat16_outputs_round_to_nearest():
    """A bfloat16 output is the float32 result rounded to nearest: within half a bfloat16 ulp
    (2^-8 relative) of the float64 value, plus the float32 math's own ~1e-6.  Triton's CPU
    interpreter (CI) converts float32 to bfloat16 by truncation instead (triton/runtime/
    interpreter.py's cast_impl passes no rounding mode; Triton 3.6-3.8), up to a whole ulp off,
    which the bfloat16 tolerances of this file allow for; a GPU compiles the same ``.to()`` to
    round-to-nearest-even (cvt.rn.bf16.f32), which this test holds it to."""
    gen = torch.Generator().manual_seed(11)
    pred = (torch.randn(4096, 17, generator=gen) * 2).to(DEVICE, torch.bfloat16)
    out = gfl_ops.integral(pred, backend="triton").double().cpu()
    exact = reference.integral(pred.double().cpu())
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)
    excess = (out - exact).abs() - (0.5 * ulp + 1e-5 * exact.abs())
    if DEVICE == "cpu" and (excess > 0).any():
        pytest.xfail("Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest)")
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} values off by more than half an ulp"
