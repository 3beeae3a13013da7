"""Softmax-integral decoding: every fused backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from gfl_testing import DTYPES, INTEGRAL_TOL, compare_to_reference
from hypothesis import given
from hypothesis import strategies as st

import gfl_ops


@given(m=st.integers(0, 64), bins=st.sampled_from([2, 5, 8, 17, 33]),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.5, 4.0, 20.0]),
       lead=st.sampled_from([(), (3,)]), seed=st.integers(0, 2**16))
def test_integral_matches_reference(backend_device, m, bins, dtype, scale, lead, seed):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.randn(*lead, m, bins, generator=gen, dtype=torch.float64) * scale)
    pred = pred.to(dtype).to(device)

    def call(p, backend):
        return gfl_ops.integral(p, backend=backend)

    compare_to_reference(call, pred, backend, loss_tol=INTEGRAL_TOL[dtype],
                         what=f"integral m={m} bins={bins} {dtype}")


def test_integral_module_matches_mmdetection_layout(backend_device):
    backend, device = backend_device
    x = torch.randn(10, 4 * 17, dtype=torch.float32, device=device)
    out = gfl_ops.Integral(16, backend=backend)(x)
    project = torch.linspace(0, 16, 17, device=device)
    expected = torch.nn.functional.linear(torch.softmax(x.reshape(-1, 17), dim=1),
                                          project[None]).reshape(-1, 4)
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
