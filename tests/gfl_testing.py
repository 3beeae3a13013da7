"""Shared helpers for the gfl_ops kernel tests: tolerances, input builders, float64 oracle runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch.torch_version import TorchVersion

import gfl_ops

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# detector/ and benchmarks/ need torch >= 2.4; gfl_ops itself runs on 2.1 (make test-oldest-torch)
needs_detector_torch = pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.4",
    reason=f"the detector and the benchmarks need torch >= 2.4, this is {torch.__version__} "
    "(gfl_ops itself runs on 2.1)",
)

# (rtol, atol) of a loss and of a gradient against the float64 reference evaluated on the same
# (already rounded) inputs.  Losses of low-precision inputs are computed and returned in float32;
# their gradients are rounded to the storage dtype.
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
# the integral's value is returned in the storage dtype
INTEGRAL_TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str
) -> None:
    rtol, atol = tol
    torch.testing.assert_close(
        actual.double().cpu(),
        expected.double().cpu(),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def run_with_grad(
    fn: Callable[[torch.Tensor], torch.Tensor],
    pred: torch.Tensor,
    upstream: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(pred), d<fn(pred), upstream>/dpred) with pred a fresh leaf."""
    leaf = pred.detach().clone().requires_grad_(True)
    out = fn(leaf)
    up = torch.ones_like(out) if upstream is None else upstream.to(out.dtype)
    (grad,) = torch.autograd.grad(out, leaf, up)
    return out.detach(), grad


def compare_to_reference(
    call: Callable[..., torch.Tensor],
    pred: torch.Tensor,
    backend: str,
    targets: dict | None = None,
    upstream_seed: int = 0,
    loss_tol=None,
    grad_tol=None,
    what: str = "",
    perturbed_targets: Sequence[dict] = (),
) -> None:
    """Compare ``call(pred, backend=backend, **targets)`` with the float64 reference.

    The reference gets the same rounded inputs, upcast to float64 on the CPU, so only the kernel's
    arithmetic is measured.  A random upstream gradient exercises the per-row gradient scale.

    ``perturbed_targets``: for ill-conditioned gradients, target dicts a rounding error away from
    ``targets``; the reference gradient is evaluated at each too, and each element's tolerance
    grows by the largest change seen there (what an exact algorithm in the kernel's precision
    could not tell apart).
    """
    targets = targets or {}
    dtype = pred.dtype
    loss_tol = loss_tol or LOSS_TOL[dtype]
    grad_tol = grad_tol or GRAD_TOL[dtype]
    ref_targets = {k: cpu64(v) for k, v in targets.items()}
    ref_out, _ = run_with_grad(
        lambda p: call(p, backend="reference", **ref_targets), pred.detach().double().cpu()
    )
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.rand(ref_out.shape, generator=gen, dtype=torch.float64) + 0.5
    ref_out, ref_grad = run_with_grad(
        lambda p: call(p, backend="reference", **ref_targets),
        pred.detach().double().cpu(),
        upstream,
    )
    if torch.isfinite(ref_out).all():
        # autograd of |y - s|^beta at s = y exactly (beta < 1) gives 0 * inf = NaN; the kernels
        # use the subgradient 0 there (docs/math.md, "Quality Focal Loss")
        ref_grad = torch.nan_to_num(ref_grad, nan=0.0)
    out, grad = run_with_grad(
        lambda p: call(p, backend=backend, **targets), pred, upstream.to(pred.device)
    )
    assert grad.dtype == dtype, f"{what}: gradient dtype {grad.dtype}, expected {dtype}"
    assert_close(out, ref_out, loss_tol, f"{what} forward")
    if perturbed_targets:
        slack = torch.zeros_like(ref_grad)
        for perturbed in perturbed_targets:
            _, moved = run_with_grad(
                lambda p, t=perturbed: call(
                    p, backend="reference", **{k: cpu64(v) for k, v in t.items()}
                ),
                pred.detach().double().cpu(),
                upstream,
            )
            slack = torch.maximum(slack, torch.nan_to_num(moved - ref_grad, nan=0.0).abs())
        # the expected value moves towards ours by up to the slack, then the usual tolerance
        ref_grad = ref_grad + (grad.double().cpu() - ref_grad).clamp(-slack, slack)
    assert_close(grad, ref_grad, grad_tol, f"{what} gradient")


def cpu64(t):
    """Move a tensor (or a tuple of them) to the CPU, floating ones in float64."""
    if isinstance(t, (tuple, list)):
        return type(t)(cpu64(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach().cpu()
    return t.double() if t.is_floating_point() else t


__all__ = [
    "DTYPES",
    "LOSS_TOL",
    "GRAD_TOL",
    "INTEGRAL_TOL",
    "assert_close",
    "run_with_grad",
    "compare_to_reference",
    "cpu64",
    "gfl_ops",
]
