"""Softmax-integral decoding: every fused backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from gfl_testing import DTYPES, INTEGRAL_TOL, compare_to_reference
from hypothesis import given
from hypothesis import strategies as st

import gfl_ops


@given(
    m=st.integers(0, 64),
    bins=st.sampled_from([2, 5, 8, 17, 33]),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.5, 4.0, 20.0]),
    lead=st.sampled_from([(), (3,)]),
    seed=st.integers(0, 2**16),
)
def test_integral_matches_reference(backend_device, m, bins, dtype, scale, lead, seed):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(*lead, m, bins, generator=gen, dtype=torch.float64) * scale
    pred = pred.to(dtype).to(device)

    def call(p, backend):
        return gfl_ops.integral(p, backend=backend)

    compare_to_reference(
        call,
        pred,
        backend,
        loss_tol=INTEGRAL_TOL[dtype],
        what=f"integral m={m} bins={bins} {dtype}",
    )


def test_integral_module_matches_mmdetection_layout(backend_device):
    backend, device = backend_device
    x = torch.randn(10, 4 * 17, dtype=torch.float32, device=device)
    out = gfl_ops.Integral(16, backend=backend)(x)
    project = torch.linspace(0, 16, 17, device=device)
    expected = torch.nn.functional.linear(
        torch.softmax(x.reshape(-1, 17), dim=1), project[None]
    ).reshape(-1, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == (10, 4)


def test_integral_gradcheck_float64(backend_device):
    backend, device = backend_device
    pred = torch.randn(4, 8, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(lambda p: gfl_ops.integral(p, backend=backend), (pred,))


@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e4), (torch.float16, 60.0)])
def test_integral_extreme_logits(backend_device, dtype, magnitude):
    backend, device = backend_device
    x = torch.full((2, 17), -magnitude, dtype=dtype, device=device)
    x[0, 3] = magnitude
    x[1, 16] = magnitude
    out = gfl_ops.integral(x, backend=backend)
    torch.testing.assert_close(out.float().cpu(), torch.tensor([3.0, 16.0]))


def test_integral_module_layouts_and_refusals(backend_device):
    """(N, 4*(n+1)) and (N, 4, n+1) decode alike; any other last dimension is refused with its
    size named (a channel-first (B, 4*(n+1), A) head used to decode silently into garbage)."""
    backend, device = backend_device
    module = gfl_ops.Integral(15, backend=backend)
    x = torch.randn(6, 4, 16, device=device)
    flat = module(x.reshape(6, 64))
    torch.testing.assert_close(module(x), flat)
    assert flat.shape == (6, 4)
    assert module(x.reshape(2, 3, 64)).shape == (2, 3, 4)
    for bad in [(1, 64, 5376), (6, 68), (64,), (6, 4, 17)]:
        with pytest.raises(
            ValueError,
            match=r"\(N, 64\) or .*\(N, 4, 16\).*got " + r"\(" + ", ".join(map(str, bad)),
        ):
            module(torch.randn(*bad, device=device))


def test_integral_module_state_dict_is_mmdetections():
    """mmdetection's Integral keeps a persistent ``project`` buffer: same key and value here, so
    checkpoints load with strict=True both ways; a project that is not the bin values is refused
    on load (the fused kernel would ignore it)."""
    module = gfl_ops.Integral(16)
    state = module.state_dict()
    assert list(state) == ["project"]
    torch.testing.assert_close(state["project"], torch.linspace(0, 16, 17))
    module.load_state_dict({"project": torch.linspace(0, 16, 17)}, strict=True)
    with pytest.raises(RuntimeError, match=r"project must be linspace\(0, 16, 17\)"):
        module.load_state_dict({"project": torch.linspace(0, 32, 17)})
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict({}, strict=True)
