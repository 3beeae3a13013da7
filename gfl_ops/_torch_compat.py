"""The torch APIs gfl_ops uses that older releases lack, with their older equivalents.

Why: mmdetection 3.x mostly runs on torch 2.0 / 2.1 (mmcv 2.1's prebuilt wheels stop there),
while the operator-registration API this package is written against (``register_fake``,
``register_autograd``, ``torch.compiler.is_compiling``) came with torch 2.2-2.4.  Everything
else in gfl_ops calls these names; on a current torch they are torch's own functions.  The
C++ side has its counterpart in csrc/torch_compat.h.

* :func:`register_fake` -- ``torch.library.register_fake`` (2.4), ``impl_abstract`` (2.2, 2.3),
  else a ``Meta`` kernel (2.1), which fake tensors and ``torch.compile`` fall back to.
* :func:`register_autograd` -- ``torch.library.register_autograd`` (2.4), else an ``Autograd``
  kernel that runs the operator below autograd inside a ``torch.autograd.Function``.
* :func:`is_compiling` -- ``torch.compiler.is_compiling`` (2.3), else ``torch._dynamo``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["register_fake", "register_autograd", "is_compiling"]

# the IMPL Library of each namespace that holds the fallback registrations: a registration lives
# as long as its Library, so they are kept for the life of the process
_LIBRARIES: dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "IMPL")
    return _LIBRARIES[namespace]


def _split(qualname: str) -> tuple[str, str]:
    namespace, _, name = qualname.partition("::")
    return namespace, name


def register_fake(qualname: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` computes the outputs' metadata of operator ``qualname`` (``"ns::op"``)
    from fake or meta inputs, for fake tensors, ``torch.compile`` and ``torch.export``."""
    if hasattr(torch.library, "register_fake"):
        return torch.library.register_fake(qualname)
    if hasattr(torch.library, "impl_abstract"):
        # torch 2.2 / 2.3 accept it only from the module that csrc/ops.cpp names
        # (impl_abstract_pystub): the caller's, one frame up, gfl_ops._cpp_backend
        return torch.library.impl_abstract(qualname, _stacklevel=2)

    def decorate(fn: Callable) -> Callable:
        namespace, name = _split(qualname)
        _library(namespace).impl(name, fn, "Meta")
        return fn

    return decorate


def register_autograd(
    qualname: str,
    backward: Callable[..., Any],
    *,
    setup_context: Callable[[Any, tuple, Any], None],
) -> None:
    """Give operator ``qualname`` (``"ns::op"``, one tensor output) an autograd formula:
    ``setup_context(ctx, inputs, output)`` saves what ``backward(ctx, grad_output)`` needs, and
    ``backward`` returns one gradient (or None) per input, as ``torch.library.register_autograd``
    takes them."""
    if hasattr(torch.library, "register_autograd"):
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    namespace, name = _split(qualname)
    op = getattr(getattr(torch.ops, namespace), name).default

    class _OpFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grad_outputs):
            return backward(ctx, *grad_outputs)

    def autograd_kernel(*inputs):
        return _OpFunction.apply(*inputs)

    _library(namespace).impl(name, autograd_kernel, "Autograd")


if hasattr(torch.compiler, "is_compiling"):
    is_compiling = torch.compiler.is_compiling
else:  # torch < 2.3: Dynamo evaluates its own is_compiling() to True while it traces
    from torch._dynamo import is_compiling
