"""The ``cpu`` and ``cuda`` backends: the C++ / CUDA operators of ``gfl_ops._C``.

The operators (``torch.ops.gfl_ops.*``, schemas in csrc/ops.cpp) get their fake kernels and the
gradient operators' derivative (double backward) here; their autograd is one C++ node per
operator at the dispatcher's Autograd key (csrc/autograd.cpp).  That is what makes
``torch.library.opcheck`` pass and ``torch.compile(fullgraph=True)`` trace them.

Gradient strategy, per device (``FUSED_GRAD``):

* fused (CPU): when ``pred`` requires grad the forward kernel also writes dL/dpred (per unit
  of incoming gradient), so the transcendental math runs once; backward is one cheap pass
  ``grad * grad_loss[:, None]``.  On a CPU the math, not memory, is the cost, so this wins.
  In eager mode that pass runs in place on the forward's buffer (``scale_rows_``), which is
  then handed out as the gradient: a step allocates one pred-sized buffer (as the gradient
  itself needs), not two.  The raw operator's second output is therefore a workspace: after
  backward it holds the scaled gradient.  A second backward through a retained graph recomputes
  (``*_backward`` ops); traced code (AOTAutograd's functional tensors, fake tensors) uses the
  out-of-place ``scale_rows``.
* recompute (CUDA): forward writes only the loss; backward recomputes the gradient scaled by
  ``grad_loss`` in one pass.  That moves fewer bytes (no saved N x C gradient written and read
  back) and holds no extra gradient-sized buffer between forward and backward, which is what a
  memory-bound GPU kernel wants.  benchmarks/README.md records the measurements.
"""

from __future__ import annotations

import torch

from gfl_ops import _cuda_archs, _reduced_loss
from gfl_ops._extension import cuda_compiled, extension_error, extension_loaded
from gfl_ops._second_order import register_gradient_autograd
from gfl_ops._torch_compat import is_compiling, register_fake

FUSED_GRAD = {"cpu": True, "cuda": False}

_ops = torch.ops.gfl_ops if extension_loaded() else None


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _needs_grad(pred: torch.Tensor) -> bool:
    return pred.requires_grad and torch.is_grad_enabled()


def _register() -> None:
    """Fake kernels and autograd formulas for the C++ operators."""
    lib = "gfl_ops::"

    def _loss_and_grad_fake(pred, with_grad, loss_dtype):
        loss = pred.new_empty(pred.shape[0], dtype=loss_dtype)
        grad = pred.new_empty(pred.shape) if with_grad else pred.new_empty(0)
        return loss, grad

    @register_fake(lib + "qfl")
    def _(pred, labels, scores, beta, activated, with_grad, grad_scale=None):
        return _loss_and_grad_fake(pred, with_grad, _opmath(pred.dtype))

    @register_fake(lib + "qfl_dense")
    def _(pred, target, beta, activated, with_grad, grad_scale=None):
        return _loss_and_grad_fake(pred, with_grad, _opmath(pred.dtype))

    @register_fake(lib + "dfl")
    def _(pred, target, with_grad, grad_scale=None):
        return _loss_and_grad_fake(pred, with_grad, _opmath(pred.dtype))

    @register_fake(lib + "integral")
    def _(pred, with_grad):
        return _loss_and_grad_fake(pred, with_grad, pred.dtype)

    for name in ("qfl_backward", "qfl_dense_backward", "dfl_backward", "integral_backward"):
        register_fake(lib + name)(lambda grad, pred, *args: torch.empty_like(pred))

    @register_fake(lib + "scale_rows")
    def _(grad, row_scale):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    @register_fake(lib + "scale_rows_")
    def _(grad, row_scale):
        return None

    # Autograd: the forward operators' nodes are C++ (csrc/autograd.cpp, registered at the
    # Autograd key: gradients flow to pred only, as in mmdetection, where the IoU scores are
    # computed from detached boxes; functional.py sends a target that requires grad to the
    # reference formulas).  The gradient operators' own derivative: double backward
    # (create_graph) is exact.
    for name, recompute in _RECOMPUTE.items():
        register_gradient_autograd(lib + recompute, name)


# op name -> the operator that recomputes its gradient
_RECOMPUTE = {
    "qfl": "qfl_backward",
    "qfl_dense": "qfl_dense_backward",
    "dfl": "dfl_backward",
    "integral": "integral_backward",
}


def _eager_functions() -> dict[str, object]:
    """op name -> the fast entry point of ``_C`` (csrc/python_module.cpp).

    Each calls the operator through the dispatcher (so its C++ autograd node, tracing modes and
    tensor subclasses apply exactly as for ``torch.ops.gfl_ops.*``) from one C call, without
    the Python argument parsing of ``torch.ops``, whose cost grows with the cold caches of a
    training step (benchmarks/README.md, "Design measurements").  It takes the operator's
    arguments (``with_grad`` last) and returns the first output (loss or decoded value) only,
    so the fused gradient buffer is owned by the autograd node alone and handed out without a
    copy.  Dynamo cannot trace a C function: compiled code calls ``torch.ops`` instead.
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
            # a GPU the build has no code for would fail at the first launch ("no kernel image")
            return _cuda_archs.unrunnable_reason()
        return None

    def _call(self, name: str, pred: torch.Tensor, *args) -> torch.Tensor:
        """The operator's first output (loss or decoded value), gradient fused when needed and
        ``FUSED_GRAD`` says so."""
        with_grad = FUSED_GRAD[self.device_type] and _needs_grad(pred)
        if is_compiling():
            return getattr(_ops, name)(pred, *args, with_grad)[0]
        return _EAGER[name](pred, *args, with_grad)

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
            and not is_compiling()
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
