"""The ``cpu`` and ``cuda`` backends: the C++ / CUDA operators of ``gfl_ops._C``.

The operators (``torch.ops.gfl_ops.*``, schemas in csrc/ops.cpp) get fake kernels and autograd
here, which is what makes ``torch.library.opcheck`` pass and ``torch.compile(fullgraph=True)``
trace them.

Gradient strategy, per device (``FUSED_GRAD``):

* fused (CPU): when ``pred`` requires grad the forward kernel also writes dL/dpred (per unit
  of incoming gradient), so the transcendental math runs once; backward is one cheap pass
  ``grad * grad_loss[:, None]``.  On a CPU the math, not memory, is the cost, so this wins.
  In eager mode that pass runs in place on the forward's buffer (``scale_rows_``), which is
  then handed out as the gradient: a step allocates one pred-sized buffer (as the gradient
  itself needs), not two.  The raw operator's second output is therefore a workspace: after
  backward it holds the scaled gradient.  A second backward through a retained graph recomputes
  (``*_backward`` ops); traced code (torch.compile, make_fx) uses the out-of-place
  ``scale_rows``.
* recompute (CUDA): forward writes only the loss; backward recomputes the gradient scaled by
  ``grad_loss`` in one pass.  That moves fewer bytes (no saved N x C gradient written and read
  back) and holds no extra gradient-sized buffer between forward and backward, which is what a
  memory-bound GPU kernel wants.  benchmarks/README.md records the measurements.
"""

from __future__ import annotations

import torch

from gfl_ops import _reduced_loss
from gfl_ops._extension import cuda_compiled, extension_error, extension_loaded
from gfl_ops._second_order import register_gradient_autograd

FUSED_GRAD = {"cpu": True, "cuda": False}

_ops = torch.ops.gfl_ops if extension_loaded() else None


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _needs_grad(pred: torch.Tensor) -> bool:
    return pred.requires_grad and torch.is_grad_enabled()


_TRACING_MODES = (
    torch._C._TorchDispatchModeKey.PROXY,
    torch._C._TorchDispatchModeKey.FAKE,
    torch._C._TorchDispatchModeKey.FUNCTIONAL,
)


def _plain_eager(t: torch.Tensor) -> bool:
    """True for an ordinary tensor outside any tracing (dynamo, make_fx, fake or functorch)."""
    # is_compiling first: dynamo folds it to True and traces none of the rest
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return False
    get_mode = torch._C._get_dispatch_mode
    for key in _TRACING_MODES:
        if get_mode(key) is not None:
            return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _register() -> None:
    """Fake kernels and autograd formulas for the C++ operators."""
    lib = "gfl_ops::"

    def _loss_and_grad_fake(pred, with_grad, loss_dtype):
        loss = pred.new_empty(pred.shape[0], dtype=loss_dtype)
        grad = pred.new_empty(pred.shape) if with_grad else pred.new_empty(0)
        return loss, grad

    @torch.library.register_fake(lib + "qfl")
    def _(pred, labels, scores, beta, activated, with_grad, grad_scale=None):
        return _loss_and_grad_fake(pred, with_grad, _opmath(pred.dtype))

    @torch.library.register_fake(lib + "qfl_dense")
    def _(pred, target, beta, activated, with_grad, grad_scale=None):
        return _loss_and_grad_fake(pred, with_grad, _opmath(pred.dtype))

    @torch.library.register_fake(lib + "dfl")
    def _(pred, target, with_grad, grad_scale=None):
        return _loss_and_grad_fake(pred, with_grad, _opmath(pred.dtype))

    @torch.library.register_fake(lib + "integral")
    def _(pred, with_grad):
        return _loss_and_grad_fake(pred, with_grad, pred.dtype)

    for name in ("qfl_backward", "qfl_dense_backward", "dfl_backward", "integral_backward"):
        torch.library.register_fake(lib + name)(lambda grad, pred, *args: torch.empty_like(pred))

    @torch.library.register_fake(lib + "scale_rows")
    def _(grad, row_scale):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "scale_rows_")
    def _(grad, row_scale):
        return None

    # Autograd: gradients flow to pred only; targets, labels and scores are constants (as in
    # mmdetection, where the IoU scores are computed from detached boxes; functional.py sends a
    # target that requires grad to the reference formulas instead).
    for name, (n_tensors, n_params, recompute) in _FUSED_OPS.items():
        torch.library.register_autograd(
            lib + name,
            _registered_backward(n_tensors, recompute),
            setup_context=lambda ctx, inputs, output, n=n_tensors, k=n_params: _save(
                ctx, inputs, output, n, k
            ),
        )
        # the gradient operators' own derivative: double backward (create_graph) is exact
        register_gradient_autograd(lib + recompute, name)


def _registered_backward(n_tensors: int, recompute: str):
    """The backward registered for a fused operator: dL/dpred, nothing for the other inputs."""

    def backward(ctx, grad_loss, _grad_grad):
        grad = _grad_input(ctx, grad_loss, getattr(_ops, recompute))
        return (grad,) + (None,) * (ctx.n_inputs - 1)

    return backward


# op name -> (number of leading tensor inputs, number of scalar arguments between them and
# with_grad, the operator that recomputes the gradient)
_FUSED_OPS = {
    "qfl": (3, 2, "qfl_backward"),
    "qfl_dense": (2, 2, "qfl_dense_backward"),
    "dfl": (2, 0, "dfl_backward"),
    "integral": (1, 0, "integral_backward"),
}


def _save(ctx, inputs: tuple, output: tuple, n_tensors: int, n_params: int) -> None:
    """setup_context of the registered autograd: what the backward of an operator call needs.

    ``inputs``: the operator's arguments (tensors, scalars, ``with_grad``, and for the losses
    ``grad_scale``); ``output``: its (loss, gradient buffer)."""
    pred, grad_buf = inputs[0], output[1]
    # the scalar arguments up to with_grad; after it, the losses' optional grad_scale
    with_grad_at = n_tensors + n_params
    if len(inputs) > with_grad_at + 1 and inputs[with_grad_at + 1] is not None:
        raise RuntimeError(
            "gfl_ops: grad_scale is for callers that differentiate the reduced "
            "loss themselves (gfl_ops/_reduced_loss.py); call the operator "
            "without it, or under torch.no_grad()"
        )
    ctx.extra = inputs[n_tensors : with_grad_at + 1]
    ctx.n_tensors = n_tensors
    ctx.n_inputs = len(inputs)
    # the second output (the saved gradient) never receives a gradient: without this,
    # autograd would allocate and zero-fill a pred-sized tensor for it on every backward
    ctx.mark_non_differentiable(grad_buf)
    ctx.set_materialize_grads(False)
    has_buf = grad_buf.dim() == pred.dim() and grad_buf.numel() == pred.numel()
    # Eager: the buffer is kept outside saved_tensors, and the first backward scales it in
    # place and hands it out as the gradient, so a step allocates one pred-sized buffer,
    # not two (fewer page faults, half the extra memory).  Traced (torch.compile, make_fx,
    # fake or functorch tensors): the functional path below.
    ctx.workspace = grad_buf if has_buf and _plain_eager(grad_buf) else None
    saved = inputs[:n_tensors]
    if has_buf and ctx.workspace is None:
        saved = (*saved, grad_buf)
    ctx.save_for_backward(*saved)


def _grad_input(ctx, grad_loss: torch.Tensor | None, recompute) -> torch.Tensor | None:
    """dL/dpred for an incoming gradient ``grad_loss`` (N,): the saved gradient scaled in place
    (eager, first backward), scaled out of place (traced), or recomputed."""
    if grad_loss is None:  # the loss output took no part in the graph being differentiated
        return None
    workspace = ctx.workspace
    # (not under create_graph: scale_rows_ has no derivative of its own)
    if workspace is not None and not torch.is_grad_enabled() and _plain_eager(grad_loss):
        # handed out once; a second backward through a retained graph recomputes
        ctx.workspace = None
        # fp32 math, one rounding to the buffer's dtype, no temporaries (an in-place torch
        # mul_ of a bf16 buffer by fp32 grad_loss allocates two fp32 copies of it)
        _ops.scale_rows_(workspace, grad_loss)
        return workspace
    # (unpacked only here: the common path above needs none of the saved tensors)
    tensors = ctx.saved_tensors
    inputs, saved_grad = tensors[: ctx.n_tensors], tensors[ctx.n_tensors :]
    # (not under create_graph: the saved gradient is a constant, so scaling it would drop the
    # second-order term; the recompute operator has a derivative of its own)
    if saved_grad and not torch.is_grad_enabled():
        return _ops.scale_rows(saved_grad[0], grad_loss)
    return recompute(grad_loss, *inputs, *ctx.extra[:-1])


def _eager_functions() -> dict[str, object]:
    """op name -> the C++ eager entry point of ``_C`` (csrc/eager_autograd.cpp).

    Plain eager calls that need the gradient go there: one C++ call builds a C++ autograd node
    around the operator's kernel, with the same saved state and backward formulas as the
    registered autograd above (``_save`` / ``_grad_input``), fused or recomputing as
    ``FUSED_GRAD`` says.  It skips the Python autograd wrapper, the Python backward and the
    ``torch.ops`` calls, whose cost grows with cold caches: at 32,000 x 17 the integral's fused
    fwd+bwd step on CPU is 10-15% faster (benchmarks/README.md, "Design measurements").  Traced
    code (torch.compile, make_fx, functorch) calls the registered operator, so what is traced is
    the operator.

    Each takes the operator's arguments with ``fused`` in place of ``with_grad`` and returns the
    loss (or the integral's value) only.
    """
    from gfl_ops._extension import _C

    return {
        "qfl": _C.qfl_eager,
        "qfl_dense": _C.qfl_dense_eager,
        "dfl": _C.dfl_eager,
        "integral": _C.integral_eager,
    }


_EAGER = _eager_functions() if _ops is not None else {}

if _ops is not None:
    _register()


class _CppBackend:
    """``cpu`` or ``cuda``: the same operators, dispatched by the tensors' device."""

    def __init__(self, device_type: str) -> None:
        self.name = device_type
        self.device_type = device_type

    def unavailable_reason(self, device_type: str) -> str | None:
        if not extension_loaded():
            return extension_error()
        if device_type != self.device_type:
            return f"the {self.name!r} backend runs on {self.device_type} tensors only"
        if self.device_type == "cuda":
            if not cuda_compiled():
                return (
                    "gfl_ops._C was built without CUDA kernels (no nvcc or a CPU-only torch "
                    "at build time); rebuild with FORCE_CUDA=1 pip install "
                    "--no-build-isolation -e ."
                )
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        return None

    def _call(self, name: str, pred: torch.Tensor, *args) -> torch.Tensor:
        """The operator's first output (loss or decoded value), gradient fused when needed and
        ``FUSED_GRAD`` says so."""
        if _needs_grad(pred):
            fused = FUSED_GRAD[self.device_type]
            if _plain_eager(pred):
                return _EAGER[name](pred, *args, fused)
            return getattr(_ops, name)(pred, *args, fused)[0]
        return getattr(_ops, name)(pred, *args, False)[0]

    def reduced_loss(
        self,
        name: str,
        pred: torch.Tensor,
        targets: tuple,
        params: tuple,
        weight: torch.Tensor | None,
        reduction: str,
        avg_factor,
    ):
        """The 'mean' / 'sum' loss with the reduction folded into the fused gradient
        (gfl_ops/_reduced_loss.py), or None where that does not apply: the recompute strategy,
        traced code, or anything but ``pred`` requiring grad."""
        if not (
            FUSED_GRAD[self.device_type]
            and _plain_eager(pred)
            and _reduced_loss.applies(pred, weight, reduction, avg_factor, targets)
        ):
            return None
        unit = _reduced_loss.reduction_unit(
            pred.shape[0], _opmath(pred.dtype), reduction, avg_factor
        )
        return _reduced_loss.reduced_loss(name, pred, targets, params, weight, unit)

    def qfl(self, pred, labels, scores, beta, activated):
        return self._call("qfl", pred, labels, scores, beta, activated)

    def qfl_dense(self, pred, target, beta, activated):
        return self._call("qfl_dense", pred, target, beta, activated)

    def dfl(self, pred, target):
        return self._call("dfl", pred, target)

    def integral(self, pred):
        return self._call("integral", pred)


CPU_BACKEND = _CppBackend("cpu")
CUDA_BACKEND = _CppBackend("cuda")
