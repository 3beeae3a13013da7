"""What a training step on the CPU relies on beyond the kernels' math (issue #19):

* the reduced losses fold their reduction into the fused gradient (gfl_ops/_reduced_loss.py,
  csrc/autograd.cpp):
  the per-row path's value and gradient up to rounding, for every reduction, weight and
  avg_factor form, any incoming gradient, a second backward and double backward;
* the kernels' own thread pool (csrc/cpu/parallel.h): results bitwise identical whatever the
  thread count, and correct when several Python threads call at once;
* the ``grad_scale`` operator argument that the reduced path uses is refused where autograd
  would differentiate it.
"""

from __future__ import annotations

import threading

import pytest
import torch

import gfl_ops
from gfl_ops import _cpp_backend

pytestmark = pytest.mark.skipif(
    not gfl_ops.extension_loaded(), reason="needs the compiled extension"
)


def _inputs(op: str, n: int = 300, cols: int = 17, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    if op == "qfl":
        pred = torch.randn(n, cols, generator=gen, dtype=dtype)
        labels = torch.randint(0, cols + 1, (n,), generator=gen)
        scores = torch.rand(n, generator=gen, dtype=dtype)
        return pred, (labels, scores)
    if op == "qfl_dense":
        pred = torch.randn(n, cols, generator=gen, dtype=dtype)
        return pred, torch.rand(n, cols, generator=gen, dtype=dtype)
    pred = torch.randn(n, cols, generator=gen, dtype=dtype)
    return pred, torch.rand(n, generator=gen, dtype=dtype) * (cols - 1)


def _loss(op: str, pred, target, **kw):
    if op == "dfl":
        return gfl_ops.distribution_focal_loss(pred, target, backend="cpu", **kw)
    return gfl_ops.quality_focal_loss(pred, target, backend="cpu", **kw)


@pytest.fixture
def plain_path(monkeypatch):
    """Switch the reduced path off: the per-row loss, weight_reduce_loss, its autograd."""

    def use_plain():
        monkeypatch.setattr(_cpp_backend._CppBackend, "reduced_loss", lambda self, *args: None)

    return use_plain


REDUCTIONS = [
    dict(reduction="mean"),
    dict(reduction="sum"),
    dict(reduction="mean", avg_factor=7.5),
    dict(reduction="mean", avg_factor=torch.tensor(3.25, dtype=torch.float64)),
    dict(reduction="mean", avg_factor=torch.tensor([3.25], dtype=torch.float64)),
]


@pytest.mark.parametrize("op", ["qfl", "qfl_dense", "dfl"])
@pytest.mark.parametrize("reduce_kw", REDUCTIONS, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_reduced_path_matches_the_per_row_path(op, reduce_kw, weighted, upstream, plain_path):
    pred, target = _inputs(op)
    weight = torch.rand(pred.shape[0], dtype=torch.float64) if weighted else None

    def run():
        p = pred.clone().requires_grad_(True)
        loss = _loss(op, p, target, weight=weight, **reduce_kw)
        (loss * upstream).backward()
        return loss.detach(), p.grad

    value, grad = run()
    plain_path()
    plain_value, plain_grad = run()
    assert value.shape == () and value.dtype == plain_value.dtype
    torch.testing.assert_close(value, plain_value.reshape(()), rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_path_in_16_and_32_bit(dtype, plain_path):
    pred, (labels, scores) = _inputs("qfl", n=2000, cols=80, dtype=torch.float32)
    pred = pred.to(dtype)

    def run():
        p = pred.clone().requires_grad_(True)
        loss = _loss("qfl", p, (labels, scores), avg_factor=40.0)
        loss.backward()
        return loss.detach(), p.grad

    value, grad = run()
    plain_path()
    plain_value, plain_grad = run()
    assert grad.dtype == dtype and value.dtype == torch.float32
    torch.testing.assert_close(value, plain_value, rtol=1e-6, atol=0)
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grad.float(), plain_grad.float(), **tol)


def test_a_second_backward_and_double_backward_recompute(plain_path):
    pred, target = _inputs("dfl")
    weight = torch.rand(pred.shape[0], dtype=torch.float64)
    p = pred.clone().requires_grad_(True)
    loss = _loss("dfl", p, target, weight=weight, avg_factor=4.0)
    loss.backward(retain_graph=True)
    first = p.grad.clone()
    loss.backward()  # the handed-out buffer is p.grad now: this one must recompute
    torch.testing.assert_close(p.grad, 2 * first, rtol=1e-12, atol=0)

    p2 = pred.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(
        _loss("dfl", p2, target, weight=weight, avg_factor=4.0), p2, create_graph=True
    )
    (gg,) = torch.autograd.grad(g.square().sum(), p2)
    plain_path()
    p3 = pred.clone().requires_grad_(True)
    (g3,) = torch.autograd.grad(
        _loss("dfl", p3, target, weight=weight, avg_factor=4.0), p3, create_graph=True
    )
    (gg3,) = torch.autograd.grad(g3.square().sum(), p3)
    torch.testing.assert_close(g, g3, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gg, gg3, rtol=1e-10, atol=1e-14)


def test_the_reduced_path_is_taken_only_where_it_applies():
    pred, target = _inputs("dfl")
    calls = []
    real = _cpp_backend._reduced_loss.reduced_loss

    def spy(*args):
        calls.append(1)
        return real(*args)

    _cpp_backend._reduced_loss.reduced_loss = spy
    try:
        p = pred.clone().requires_grad_(True)
        _loss("dfl", p, target).backward()
        assert len(calls) == 1
        _loss("dfl", p, target, reduction="none").sum().backward()  # per-row loss
        _loss("dfl", p.detach(), target)  # no gradient needed
        w = torch.rand(pred.shape[0], dtype=torch.float64, requires_grad=True)
        _loss("dfl", p, target, weight=w).backward()  # the weight needs its gradient
        assert w.grad is not None and torch.isfinite(w.grad).all()
        assert len(calls) == 1
    finally:
        _cpp_backend._reduced_loss.reduced_loss = real


def test_grad_scale_is_refused_under_autograd():
    pred, (labels, scores) = _inputs("qfl")
    p = pred.clone().requires_grad_(True)
    scale = torch.ones(pred.shape[0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grad_scale is for callers"):
        torch.ops.gfl_ops.qfl(p, labels, scores, 2.0, False, True, scale)
    with pytest.raises(RuntimeError, match="needs with_grad=True"):
        torch.ops.gfl_ops.dfl(pred, torch.rand(pred.shape[0], dtype=torch.float64), False, scale)
    with pytest.raises(RuntimeError, match=r"grad_scale must have shape \(300,\)"):
        torch.ops.gfl_ops.dfl(pred, torch.rand(pred.shape[0], dtype=torch.float64), True, scale[:7])
    # with it, each gradient row is scaled; the loss rows are not
    loss, grad = torch.ops.gfl_ops.qfl(pred, labels, scores, 2.0, False, True, scale * 3)
    loss1, grad1 = torch.ops.gfl_ops.qfl(pred, labels, scores, 2.0, False, True)
    assert torch.equal(loss, loss1)
    torch.testing.assert_close(grad, grad1 * 3, rtol=1e-15, atol=0)


@pytest.mark.parametrize("op", ["qfl", "dfl", "integral"])
def test_results_do_not_depend_on_the_thread_count(op):
    gen = torch.Generator().manual_seed(5)
    rows, cols = (20000, 80) if op == "qfl" else (50000, 17)
    pred = torch.randn(rows, cols, generator=gen)
    target = (
        (torch.randint(0, cols + 1, (rows,), generator=gen), torch.rand(rows, generator=gen))
        if op == "qfl"
        else torch.rand(rows, generator=gen) * (cols - 1)
    )
    upstream = torch.randn(rows, generator=gen)

    def run():
        p = pred.clone().requires_grad_(True)
        if op == "integral":
            out = gfl_ops.integral(p, backend="cpu")
            out.backward(upstream)
        else:
            out = _loss(op, p, target, reduction="none")
            out.backward(upstream)
        return out.detach(), p.grad

    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


def test_several_python_threads_at_once():
    pred, (labels, scores) = _inputs("qfl", n=20000, cols=80, dtype=torch.float32)
    expected_loss, expected_grad = torch.ops.gfl_ops.qfl(pred, labels, scores, 2.0, False, True)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                loss, grad = torch.ops.gfl_ops.qfl(pred, labels, scores, 2.0, False, True)
                assert torch.equal(loss, expected_loss) and torch.equal(grad, expected_grad)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 17, 32000])
def test_the_value_checks_range_is_aminmax(dtype, n):
    """The value checks read CPU tensors' (min, max) with ``_C.value_range``: aminmax's values,
    NaN in both wherever a NaN sits (vector body, tail, first element), any stride."""
    from gfl_ops._extension import _C

    t = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    for view in (t, t[::2], t[1:]):
        if view.numel():
            # (float32: torch < 2.2 has no CPU aminmax for float16; the conversion is exact)
            expected = torch.aminmax(view.float() if dtype == torch.float16 else view)
            assert _C.value_range(view) == tuple(x.item() for x in expected)
    for pos in {0, n // 2, n - 1}:
        u = t.clone()
        u[pos] = float("nan")
        lo, hi = _C.value_range(u)
        assert lo != lo and hi != hi
    with pytest.raises(ValueError, match="non-empty floating CPU tensor"):
        _C.value_range(t[:0])
