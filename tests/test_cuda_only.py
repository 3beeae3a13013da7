"""Checks that need a GPU: CUDA-graph capture and replay, autocast with GradScaler, int64 indexing
past 2^31 elements.  They skip without CUDA (and are not counted as passing: see
test_torch_integration.test_cuda_kernels_compiled_when_build_had_cuda for what CI checks)."""

from __future__ import annotations

import pytest
import torch

import gfl_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [
    b
    for b in ("cuda", "triton")
    if torch.cuda.is_available() and b in gfl_ops.available_backends("cuda")
]


def _losses(cls, labels, scores, reg, target, backend):
    return (
        gfl_ops.quality_focal_loss(cls, (labels, scores), avg_factor=7.0, backend=backend)
        + gfl_ops.distribution_focal_loss(reg, target, avg_factor=4.0, backend=backend)
        + gfl_ops.integral(reg, backend=backend).mean()
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    gen = torch.Generator(device="cuda").manual_seed(0)
    cls = torch.randn(2048, 80, device="cuda", generator=gen, requires_grad=True)
    labels = torch.randint(0, 81, (2048,), device="cuda", generator=gen)
    scores = torch.rand(2048, device="cuda", generator=gen)
    reg = torch.randn(4096, 17, device="cuda", generator=gen, requires_grad=True)
    target = torch.rand(4096, device="cuda", generator=gen) * 16

    def step():
        cls.grad = None
        reg.grad = None
        loss = _losses(cls, labels, scores, reg, target, backend)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (Triton compiles, allocator settles) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    eager_loss = step().detach().clone()
    eager_grads = (cls.grad.clone(), reg.grad.clone())

    graph = torch.cuda.CUDAGraph()
    cls.grad = None
    reg.grad = None
    with torch.cuda.graph(graph):
        static_loss = _losses(cls, labels, scores, reg, target, backend)
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_loss, eager_loss)
    assert torch.equal(cls.grad, eager_grads[0]) and torch.equal(reg.grad, eager_grads[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_autocast_with_grad_scaler_gives_finite_losses(backend, amp_dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 80 + 4 * 17).cuda()
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    feats = torch.randn(4096, 64, device="cuda") * 30  # large logits, the classic AMP NaN case
    labels = torch.randint(0, 81, (4096,), device="cuda")
    scores = torch.rand(4096, device="cuda")
    target = torch.rand(4096 * 4, device="cuda") * 16
    for _ in range(5):
        with torch.autocast("cuda", dtype=amp_dtype):
            out = head(feats)
            cls, reg = out[:, :80], out[:, 80:].reshape(-1, 17)
            assert cls.dtype == amp_dtype
            loss = _losses(cls, labels, scores, reg, target, backend)
        assert torch.isfinite(loss), loss
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert all(torch.isfinite(p).all() for p in head.parameters())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_pow_31_elements(backend):
    """QFL on N x C > 2^31 elements: every row is reached (int64 offsets)."""
    free, _ = torch.cuda.mem_get_info()
    n, c = 27_000_000, 80  # 2.16e9 elements, 4.3 GB in bf16 (+ the same for the gradient)
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    pred = torch.zeros(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((n,), c, device="cuda")
    labels[-1] = c - 1  # a positive in the very last row, past 2^31 elements
    scores = torch.ones(n, device="cuda")
    loss = gfl_ops.quality_focal_loss(pred, (labels, scores), reduction="none", backend=backend)
    # sigmoid(0) = 0.5: background rows lose c * 0.25 * log 2, the last row one class less plus
    # |1 - 0.5|^2 * log 2 for its positive: the same value
    expected = c * 0.25 * torch.log(torch.tensor(2.0)).item()
    assert loss[0].item() == pytest.approx(expected, rel=1e-5)
    assert loss[-1].item() == pytest.approx(expected, rel=1e-5)
    loss.sum().backward()
    # dL/dx at x = 0: beta |d| sign(d) s (1 - s) BCE + d^2 d  with d = s - y, s = 0.5
    log2 = 0.6931471805599453
    assert pred.grad[-1, c - 1].item() == pytest.approx(-0.25 * log2 - 0.125, rel=1e-2)
    assert pred.grad[0, 0].item() == pytest.approx(0.25 * log2 + 0.125, rel=1e-2)
    del pred, loss
    torch.cuda.empty_cache()
