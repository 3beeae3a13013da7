"""The operators as real torch operators: opcheck, torch.compile(fullgraph=True), bitwise
determinism, non-contiguous and expanded inputs, and the extension build."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gfl_ops
from gfl_ops import _extension

needs_ext = pytest.mark.skipif(
    not gfl_ops.extension_loaded(), reason=f"gfl_ops._C not loaded: {gfl_ops.extension_error()}"
)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _op_samples(device: str, dtype: torch.dtype):
    """(operator, args) pairs covering every C++ operator, with and without the fused gradient."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        return t.requires_grad_(grad)

    n, c, m, bins = 9, 5, 7, 17
    labels = torch.tensor([0, 5, 3, 5, 1, 2, 5, 4, 0], device=device)
    scores = torch.rand(n, generator=gen).to(dtype).to(device)
    dense = torch.rand(n, c, generator=gen).to(dtype).to(device)
    target = (torch.rand(m, generator=gen) * 16).to(device)
    ops = torch.ops.gfl_ops
    samples = []
    for with_grad in (False, True):
        samples += [
            (ops.qfl.default, (rand(n, c, grad=True), labels, scores, 2.0, False, with_grad)),
            (ops.qfl_dense.default, (rand(n, c, grad=True), dense, 1.5, False, with_grad)),
            (ops.dfl.default, (rand(m, bins, grad=True), target, with_grad)),
            (ops.integral.default, (rand(m, bins, grad=True), with_grad)),
        ]
    probs = rand(n, c).sigmoid().detach().requires_grad_()
    samples += [
        (ops.qfl.default, (probs, labels, scores, 2.0, True, False)),
        (ops.qfl_backward.default, (rand(n), rand(n, c), labels, scores, 2.0, False)),
        (ops.qfl_dense_backward.default, (rand(n), rand(n, c), dense, 2.0, False)),
        (ops.dfl_backward.default, (rand(m), rand(m, bins), target)),
        (ops.integral_backward.default, (rand(m), rand(m, bins))),
        (ops.scale_rows.default, (rand(m, bins), rand(m))),
        (ops.scale_rows_.default, (rand(m, bins), rand(m))),
    ]
    return samples


@needs_ext
@pytest.mark.skipif(
    not hasattr(torch.library, "opcheck"),
    reason=f"torch.library.opcheck came with torch 2.4; this is {torch.__version__} "
    "(test_fake_kernels_match_the_real_outputs checks the fake kernels on every torch)",
)
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_every_operator(device, dtype):
    for op, args in _op_samples(device, dtype):
        # test_aot_dispatch_dynamic compiles through AOTAutograd; it is covered (much faster)
        # by the fullgraph tests below.
        torch.library.opcheck(
            op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
        )


@needs_ext
@pytest.mark.parametrize("device", _devices())
def test_fake_kernels_match_the_real_outputs(device):
    """Every operator's fake kernel (gfl_ops._torch_compat.register_fake: torch's register_fake,
    impl_abstract or a Meta kernel, by torch release) gives the real outputs' shapes, dtypes and
    devices; what opcheck's test_faketensor asserts, also on a torch without opcheck."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op, args in _op_samples(device, torch.float32):
        real = op(*args)
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real_outs = real if isinstance(real, tuple) else (real,)
        fake_outs = fake if isinstance(fake, tuple) else (fake,)
        assert len(real_outs) == len(fake_outs), op
        for r, f in zip(real_outs, fake_outs):
            if r is None:
                assert f is None, op
                continue
            assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device), op


def _loss_step(pred_cls, labels, scores, pred_reg, dfl_target, backend):
    qfl = gfl_ops.quality_focal_loss(pred_cls, (labels, scores), avg_factor=3.0, backend=backend)
    dfl = gfl_ops.distribution_focal_loss(
        pred_reg,
        dfl_target,
        weight=scores.repeat(4)[: pred_reg.shape[0]],
        avg_factor=4.0,
        backend=backend,
    )
    boxes = gfl_ops.integral(pred_reg, backend=backend)
    return qfl + 0.25 * dfl + boxes.mean()


@pytest.mark.parametrize(
    "backend,device",
    [("cpu", "cpu"), (None, "cpu")]
    + ([("cuda", "cuda"), (None, "cuda")] if torch.cuda.is_available() else []),
)
def test_compile_fullgraph_forward_backward(backend, device):
    """All three ops, validation and automatic backend choice included, trace into one graph and
    give the eager results."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    pred_cls = torch.randn(32, 6, generator=gen).to(device)
    labels = torch.randint(0, 7, (32,), generator=gen).to(device)
    scores = torch.rand(32, generator=gen).to(device)
    pred_reg = torch.randn(24, 17, generator=gen).to(device)
    dfl_target = (torch.rand(24, generator=gen) * 16).to(device)

    def forward(a, b):
        return _loss_step(a, labels, scores, b, dfl_target, backend)

    # fullgraph: any graph break in the forward raises; AOTAutograd traces the backward from it
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")

    def run(fn):
        args = (pred_cls.clone().requires_grad_(), pred_reg.clone().requires_grad_())
        loss = fn(*args)
        return (loss, *torch.autograd.grad(loss, args))

    for e, t in zip(run(forward), run(compiled)):
        torch.testing.assert_close(t, e)


def test_compile_fullgraph_inductor_cpu():
    """The default inductor backend compiles the ops with no graph break."""
    torch._dynamo.reset()
    pred = torch.randn(16, 5, requires_grad=True)
    labels = torch.randint(0, 6, (16,))
    scores = torch.rand(16)

    def forward(p):
        return gfl_ops.quality_focal_loss(p, (labels, scores), backend="cpu")

    compiled = torch.compile(forward, fullgraph=True)
    torch.testing.assert_close(
        torch.autograd.grad(compiled(pred), pred)[0], torch.autograd.grad(forward(pred), pred)[0]
    )


def test_bitwise_deterministic_across_runs_and_threads(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(5)
    pred = torch.randn(3000, 80, generator=gen).to(device)
    labels = torch.randint(0, 81, (3000,), generator=gen).to(device)
    scores = torch.rand(3000, generator=gen).to(device)
    reg = torch.randn(4000, 17, generator=gen).to(device)
    target = (torch.rand(4000, generator=gen) * 16).to(device)

    def run():
        p = pred.clone().requires_grad_()
        r = reg.clone().requires_grad_()
        loss = (
            gfl_ops.quality_focal_loss(p, (labels, scores), backend=backend)
            + gfl_ops.distribution_focal_loss(r, target, backend=backend)
            + gfl_ops.integral(r, backend=backend).sum()
        )
        loss.backward()
        return loss.detach(), p.grad, r.grad

    threads = torch.get_num_threads()
    first = run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, run(), single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_non_contiguous_and_expanded_inputs(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(12, 20, generator=gen).to(device)
    pred = base[:, ::2]  # non-contiguous (12, 10)
    labels = torch.tensor([3], device=device).expand(12)  # expanded, stride 0
    scores = torch.rand(1, generator=gen).to(device).expand(12)
    dense = torch.rand(10, generator=gen).to(device).expand(12, 10)
    for target in ((labels, scores), dense):
        ours = gfl_ops.quality_focal_loss(pred, target, reduction="none", backend=backend)
        ref = gfl_ops.quality_focal_loss(
            pred.contiguous(),
            target if isinstance(target, tuple) else target.contiguous(),
            reduction="none",
            backend="reference",
        )
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    reg = torch.randn(17, 8, generator=gen).to(device).t()  # (8, 17) transposed
    torch.testing.assert_close(
        gfl_ops.integral(reg, backend=backend),
        gfl_ops.reference.integral(reg),
        rtol=1e-5,
        atol=1e-5,
    )
    dfl_t = torch.rand(16, generator=gen).to(device)[::2] * 16
    torch.testing.assert_close(
        gfl_ops.distribution_focal_loss(reg, dfl_t, reduction="none", backend=backend),
        gfl_ops.reference.distribution_focal_loss(reg, dfl_t),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gradients_never_written_into_inputs(backend_device):
    backend, device = backend_device
    pred = torch.randn(5, 3, device=device, requires_grad=True)
    before = pred.detach().clone()
    loss = gfl_ops.quality_focal_loss(pred, torch.rand(5, 3, device=device), backend=backend)
    loss.backward()
    loss2 = gfl_ops.quality_focal_loss(pred, torch.rand(5, 3, device=device), backend=backend)
    loss2.backward()  # a second graph over the same leaf accumulates, nothing is aliased
    assert torch.equal(pred.detach(), before)


def test_retain_graph_backward_twice_gives_same_gradient(backend_device):
    """The CPU backend's first backward scales the forward's gradient buffer in place and hands
    it out; a second backward through the retained graph must recompute, not reuse it."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(6, 4, generator=gen).to(device).requires_grad_()
    labels = torch.tensor([0, 1, 4, 2, 4, 3], device=device)
    reg = torch.randn(7, 17, generator=gen).to(device).requires_grad_()
    target = (torch.rand(7, generator=gen) * 16).to(device)
    upstream = torch.randn(7, generator=gen).to(device)
    cases = [
        (
            pred,
            gfl_ops.quality_focal_loss(
                pred, (labels, torch.rand(6, device=device)), backend=backend
            ),
            None,
        ),
        (
            reg,
            gfl_ops.distribution_focal_loss(reg, target, weight=upstream.abs(), backend=backend),
            None,
        ),
        (reg, gfl_ops.integral(reg, backend=backend), upstream),
    ]
    for leaf, out, grad_out in cases:
        (g1,) = torch.autograd.grad(out, leaf, grad_out, retain_graph=True)
        (g2,) = torch.autograd.grad(out, leaf, grad_out, retain_graph=True)
        (g3,) = torch.autograd.grad(out, leaf, grad_out)
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)
        assert torch.equal(g2, g3)


def test_extension_reports_its_state():
    if gfl_ops.extension_loaded():
        assert gfl_ops.extension_error() is None
        assert hasattr(torch.ops.gfl_ops, "qfl")
    else:
        assert "pip install --no-build-isolation -e ." in gfl_ops.extension_error()


def test_cuda_kernels_compiled_when_build_had_cuda():
    """A CUDA compile is part of every build where nvcc and a CUDA torch exist; CI has both, so a
    skipped CUDA test can never hide kernels that were silently left out of the build."""
    import os

    from torch.utils.cpp_extension import CUDA_HOME

    if not gfl_ops.extension_loaded():
        pytest.fail(f"gfl_ops._C is not loaded: {gfl_ops.extension_error()}")
    expect_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
        and os.environ.get("GFL_OPS_CPU_ONLY", "0") in ("", "0")
    )
    if not expect_cuda:
        pytest.skip("this build environment has no nvcc / CUDA torch: CUDA kernels not expected")
    version = subprocess.run(
        [os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True
    ).stdout
    nvcc_major = version.split("release ")[1].split(".")[0] if "release " in version else None
    if nvcc_major != torch.version.cuda.split(".")[0]:
        # setup.py leaves the CUDA kernels out there: torch builds no extension across majors
        pytest.skip(f"nvcc {nvcc_major} is not torch's CUDA {torch.version.cuda}")
    assert _extension.cuda_compiled(), "nvcc and CUDA torch present but _C has no CUDA kernels"
    # the CUDA kernels are registered with the dispatcher
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gfl_ops::qfl", "CUDA")
    for name in ("qfl_dense", "dfl", "integral", "scale_rows", "qfl_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gfl_ops::{name}", "CUDA")


def _fresh_interpreter(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new Python (nothing imported yet), capturing its output."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_without_compiled_extension_explains_and_falls_back():
    """With _C missing, gfl_ops imports, says how to rebuild, and the reference backend works.
    (A fresh interpreter in which importing gfl_ops._C fails as it does in an unbuilt checkout.)"""

    code = (
        "import importlib.abc, sys\n"
        "class NoExtension(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'gfl_ops._C':\n"
        "            raise ModuleNotFoundError(\"No module named 'gfl_ops._C'\")\n"
        "sys.meta_path.insert(0, NoExtension())\n"
        "import torch, gfl_ops\n"
        "assert not gfl_ops.extension_loaded()\n"
        "print(gfl_ops.extension_error())\n"
        "print(gfl_ops.available_backends('cpu'))\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "gfl_ops.quality_focal_loss(x, (torch.tensor([0, 3, 1, 2]), torch.rand(4))).backward()\n"
        "try:\n"
        "    gfl_ops.quality_focal_loss(x, torch.rand(4, 3), backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    result = _fresh_interpreter(code)
    assert result.returncode == 0, result.stderr
    assert "not built" in result.stdout and "pip install --no-build-isolation -e ." in result.stdout
    # the automatic choice says, once, that it runs the slow reference formulas, and why
    assert result.stderr.count("so the automatic choice is the 'reference' backend") == 1
    assert "'cpu' backend cannot run on cpu tensors here (the compiled extension" in result.stderr
    assert "'reference'" in result.stdout
    assert "ERR gfl_ops backend 'cpu' cannot run" in result.stdout


def test_extension_compiled_for_another_torch_is_not_loaded():
    """setup.py records the torch it compiled _C against (gfl_ops/_build_info.py); a different
    torch at import leaves _C unloaded -- a library built for other torch headers may load and
    still disagree about layouts -- says both versions and how to rebuild, and the automatic
    choice falls back, with its warning, to the reference formulas."""
    code = (
        "import sys, types\n"
        "record = types.ModuleType('gfl_ops._build_info')\n"
        "record.TORCH_VERSION, record.TORCH_CUDA = '2.99.0+cu999', '99.9'\n"
        "sys.modules['gfl_ops._build_info'] = record\n"
        "import torch, gfl_ops\n"
        "assert not gfl_ops.extension_loaded()\n"
        "assert 'gfl_ops._C' not in sys.modules\n"
        "print(gfl_ops.extension_error())\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "gfl_ops.quality_focal_loss(x, (torch.tensor([0, 3, 1, 2]), torch.rand(4))).backward()\n"
    )
    result = _fresh_interpreter(code)
    assert result.returncode == 0, result.stderr
    assert "compiled against torch 2.99.0+cu999 (CUDA 99.9)" in result.stdout
    assert f"but this is torch {torch.__version__}" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout
    assert "so the automatic choice is the 'reference' backend" in result.stderr


def test_python_m_gfl_ops_reports_the_installation():
    """``python -m gfl_ops``: versions, the build's record and every backend's state, in one
    screen for a bug report."""
    result = subprocess.run(
        [sys.executable, "-m", "gfl_ops"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"torch {torch.__version__}" in out
    if gfl_ops.extension_loaded():
        assert f"compiled against torch {torch.__version__}" in out
        assert f"CPU kernels: {_extension.cpu_kernel_isa()} build" in out
    else:
        assert "compiled extension: NOT LOADED" in out
    assert "backends for cpu tensors:" in out and "backends for cuda tensors:" in out
    assert "automatic choice: qfl -> " in out


def test_build_records_the_torch_it_compiled_against():
    """The checkout's in-place build wrote its record, and it names this torch."""
    if not gfl_ops.extension_loaded():
        pytest.fail(f"gfl_ops._C is not loaded: {gfl_ops.extension_error()}")
    from gfl_ops import _build_info

    assert (_build_info.TORCH_VERSION, _build_info.TORCH_CUDA) == (
        str(torch.__version__),
        torch.version.cuda,
    )


@needs_ext
def test_operators_complete_right_after_import():
    """In a fresh interpreter, ``import gfl_ops`` alone gives the raw operators their autograd and
    fake kernels: calling ``torch.ops.gfl_ops.*`` before any gfl_ops function differentiates
    correctly (before, they were registered at the first gfl_ops call, and a direct call's
    backward went through torch's "autograd not implemented" fallback)."""

    code = (
        "import warnings, torch, gfl_ops\n"
        "warnings.simplefilter('error')\n"
        "p = torch.randn(5, 17, dtype=torch.float64, requires_grad=True)\n"
        "out, _ = torch.ops.gfl_ops.integral(p, True)\n"
        "out.sum().backward()\n"
        "s = torch.softmax(p.detach(), -1)\n"
        "j = torch.arange(17, dtype=torch.float64)\n"
        "want = s * (j - (s * j).sum(-1, keepdim=True))\n"
        "assert torch.allclose(p.grad, want), (p.grad - want).abs().max()\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "x = p.detach()\n"
        "with FakeTensorMode() as mode:\n"
        "    fake = mode.from_tensor(x)\n"
        "    assert torch.ops.gfl_ops.integral(fake, False)[0].shape == (5,)\n"
        "print('ok')\n"
    )
    result = _fresh_interpreter(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_cpu_kernels_built_with_openmp():
    """at::parallel_for is a header template around ``#pragma omp parallel``: an extension
    compiled without -fopenmp silently runs every CPU kernel on one thread (this happened: it
    halved the CPU backend's speed on 2 cores and no correctness test could notice)."""
    if not gfl_ops.extension_loaded():
        pytest.fail(f"gfl_ops._C is not loaded: {gfl_ops.extension_error()}")
    if not (torch.backends.openmp.is_available() and sys.platform.startswith("linux")):
        pytest.skip("torch here is not built with OpenMP on Linux")
    assert _extension.openmp_enabled(), "gfl_ops._C was compiled without OpenMP"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cols", [1, 3, 17, 20, 33, 80, 130])
def test_scale_rows_in_and_out_of_place(dtype, cols):
    """scale_rows / scale_rows_ (the fused backward's pass) against grad * scale[:, None] for
    ragged and full blocks of rows, and for contiguous, expanded and strided scales."""
    ops = torch.ops.gfl_ops
    gen = torch.Generator().manual_seed(cols)
    for rows in (0, 5, 16, 37):
        grad = torch.randn(rows, cols, generator=gen).to(dtype)
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        base = torch.randn(rows, 3, generator=gen).to(opmath)
        for scale in (base[:, 0].contiguous(), base[:1, 0].expand(rows), base[:, 1]):
            want = (grad.double() * scale.double()[:, None]).to(dtype)
            torch.testing.assert_close(ops.scale_rows(grad, scale), want, rtol=0, atol=0)
            in_place = grad.clone()
            ops.scale_rows_(in_place, scale)
            torch.testing.assert_close(in_place, want, rtol=0, atol=0)
