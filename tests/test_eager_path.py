"""The eager path of the operators: the fast entry points (csrc/python_module.cpp) call the
operators through the dispatcher, whose Autograd kernels (csrc/autograd.cpp) build the C++ node.
It must give the operator called through torch.ops the same numbers bit for bit under both
gradient strategies (fused, recompute), hand out the fused forward's buffer as the gradient
without a copy, and recompute wherever the buffer cannot be used (retained graphs are covered in
test_torch_integration.py)."""

from __future__ import annotations

import threading

import pytest
import torch

import gfl_ops
from gfl_ops import _cpp_backend, _extension

pytestmark = pytest.mark.skipif(
    not gfl_ops.extension_loaded(), reason=f"gfl_ops._C not loaded: {gfl_ops.extension_error()}"
)

ops = torch.ops.gfl_ops


@pytest.fixture(params=[True, False], ids=["fused", "recompute"])
def strategy(request, monkeypatch) -> bool:
    """The CPU backend's gradient strategy (``FUSED_GRAD['cpu']``), both ways."""
    monkeypatch.setitem(_cpp_backend.FUSED_GRAD, "cpu", request.param)
    return request.param


def _cases(dtype: torch.dtype, fused: bool = True):
    """(name, pred, public call, registered-operator call) for each operator."""
    gen = torch.Generator().manual_seed(7)
    n, c, m, bins = 11, 6, 13, 17

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    labels = torch.tensor([0, 6, 3, 6, 1, 2, 6, 5, 0, 4, 6])
    scores = torch.rand(n, generator=gen).to(dtype)
    dense = torch.rand(n, c, generator=gen).to(dtype)
    target = torch.rand(m, generator=gen) * 16
    target[0] = 16.0  # the last bin exactly
    return [
        (
            "qfl",
            leaf(n, c),
            lambda p: gfl_ops.quality_focal_loss(p, (labels, scores), reduction="none"),
            lambda p: ops.qfl(p, labels, scores, 2.0, False, fused)[0],
        ),
        (
            "qfl_dense",
            leaf(n, c),
            lambda p: gfl_ops.quality_focal_loss(p, dense, reduction="none"),
            lambda p: ops.qfl_dense(p, dense, 2.0, False, fused)[0],
        ),
        (
            "dfl",
            leaf(m, bins),
            lambda p: gfl_ops.distribution_focal_loss(p, target, reduction="none"),
            lambda p: ops.dfl(p, target.to(torch.promote_types(dtype, torch.float32)), fused)[0],
        ),
        ("integral", leaf(m, bins), gfl_ops.integral, lambda p: ops.integral(p, fused)[0]),
    ]


def _grad(fn, pred: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = fn(pred)
    (grad,) = torch.autograd.grad(out, pred, upstream.to(out.dtype))
    return out.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_same_bits_as_the_registered_operator(dtype, strategy):
    for name, pred, public, registered in _cases(dtype, strategy):
        upstream = torch.randn(pred.shape[0], generator=torch.Generator().manual_seed(1))
        out_eager, grad_eager = _grad(public, pred, upstream)
        out_op, grad_op = _grad(registered, pred, upstream)
        assert torch.equal(out_eager, out_op.to(out_eager.dtype)), name
        assert torch.equal(grad_eager, grad_op), name
        assert grad_eager.dtype == pred.dtype, name


def test_gradient_is_the_forward_buffer_not_a_copy():
    """The node lets go of its buffer when it hands it out, so AccumulateGrad adopts it: the
    gradient reaching ``pred.grad`` is the tensor the backward returned (one buffer per step)."""
    for name, pred, public, _ in _cases(torch.float32):
        seen: list[int] = []
        handle = pred.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        public(pred).sum().backward()
        handle.remove()
        assert pred.grad is not None and seen == [pred.grad.data_ptr()], name


@pytest.mark.parametrize("name", ["qfl", "qfl_dense", "dfl", "integral"])
def test_batched_upstream_gradients_recompute(name, strategy):
    """autograd.grad(is_grads_batched=True) runs the backward under vmap: the batched incoming
    gradient cannot scale the buffer in place, so the gradient is recomputed, per batch entry."""
    case = next(c for c in _cases(torch.float64) if c[0] == name)
    _, pred, public, _ = case
    upstream = torch.randn(
        3, pred.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    out = public(pred)
    (batched,) = torch.autograd.grad(out, pred, upstream, is_grads_batched=True)
    for i in range(3):
        (one,) = torch.autograd.grad(public(pred), pred, upstream[i])
        torch.testing.assert_close(batched[i], one, rtol=1e-12, atol=1e-12)


def test_entry_points_reject_malformed_calls():
    c_module = _extension._C
    pred = torch.randn(4, 17, requires_grad=True)
    with pytest.raises(TypeError, match="takes 2 arguments, got 1"):
        c_module.integral_eager(pred)
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        c_module.integral_eager([1.0], True)
    with pytest.raises(TypeError, match="must be real number"):
        c_module.qfl_dense_eager(
            torch.randn(4, 3, requires_grad=True), torch.rand(4, 3), "2", False, True
        )


def test_python_hooks_anomaly_mode_and_threads(strategy):
    """The C++ entry points build the node without the GIL: Python saved-tensor hooks, anomaly
    mode (which records a Python stack) and concurrent callers must still work."""
    pred = torch.randn(6, 17, requires_grad=True)
    packed: list[torch.Size] = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gfl_ops.integral(pred)
    out.sum().backward()
    assert packed == [pred.shape] and pred.grad is not None
    with pytest.warns(UserWarning, match="Anomaly Detection"), torch.autograd.detect_anomaly():
        pred.grad = None
        gfl_ops.distribution_focal_loss(pred, torch.rand(6) * 16).backward()
    assert torch.isfinite(pred.grad).all()

    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(50):
                q = torch.randn(64, 17, requires_grad=True)
                gfl_ops.integral(q).sum().backward()
                assert torch.isfinite(q.grad).all()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
