"""The ``triton`` backend: Triton kernels for QFL, DFL and the softmax integral.

Selected with ``backend="triton"`` (or ``GFL_OPS_BACKEND=triton``) behind the public API of
:mod:`gfl_ops.functional`, which does validation, weighting and reduction; this package returns
unreduced, autograd-aware per-row values (the interface in :mod:`gfl_ops._registry`).

Where it runs: CUDA tensors (any GPU Triton supports), and CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported; slow, for tests and CI).

Operators (``torch.ops.gfl_ops.*``, ``torch.library.custom_op`` with fake kernels and autograd,
so ``torch.library.opcheck`` passes and ``torch.compile(fullgraph=True)`` traces forward and
backward without a graph break; ``triton_op`` + ``wrap_triton`` was tried by the project and
failed opcheck/compile under the interpreter):

* ``triton_qfl_fwd`` / ``triton_qfl_dense_fwd`` / ``triton_dfl_fwd`` / ``triton_integral_fwd``:
  forward only; backward recomputes through the matching ``*_bwd`` op.
* ``*_fwd_fused``: forward that also returns the unscaled gradient; backward is
  ``triton_scale_rows``.

Fused forward or recompute in backward (``gfl_ops.triton._common.FUSED_BACKWARD``, default
``False`` = recompute).  Counting bytes for QFL with (labels, scores) targets on N×C logits:

* recompute: forward reads N·C; backward reads N·C and writes N·C -> 3 N·C;
* fused: forward reads N·C and writes an N·C gradient; backward reads it and writes N·C ->
  4 N·C, plus an N·C buffer held from forward to backward.

The kernels are memory-bound for fp32 on an H100-class GPU (roughly 35 ALU and 4-5 MUFU
instructions per element against 4-8 bytes moved per element), so recompute should be about 25 %
faster for the pair and holds no extra memory; for fp16/bf16 the transcendental work is about as
costly as the memory traffic, which is where fused could win.  DFL and the integral move M·(n+1)
elements with one exp per element: the same count applies.  The switch exists so that the GPU
benchmarks (issue #7) can settle it by measurement; both paths are tested.

Block heuristics (``tl.constexpr``, no autotuning, so the interpreter and CUDA graphs see one
deterministic configuration): see :func:`gfl_ops.triton.qfl.qfl_block_c` and
:func:`gfl_ops.triton.dfl.bins_config`.
"""

from __future__ import annotations

import torch

from gfl_ops.triton import _common
from gfl_ops.triton._common import KERNEL_DTYPES, LABEL_DTYPES, env_interpret_requested
from gfl_ops.triton.dfl import dfl_fwd, dfl_fwd_fused
from gfl_ops.triton.integral import integral_fwd, integral_fwd_fused
from gfl_ops.triton.qfl import qfl_dense_fwd, qfl_dense_fwd_fused, qfl_fwd, qfl_fwd_fused

__all__ = ["BACKEND", "TritonBackend"]


def _kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """Floating dtypes the kernels cannot read (float8, ...) are upcast to float32 (a copy)."""
    return t if t.dtype in KERNEL_DTYPES else t.float()


def _fused(pred: torch.Tensor) -> bool:
    return _common.FUSED_BACKWARD and pred.requires_grad and torch.is_grad_enabled()


class TritonBackend:
    """Backend object for :mod:`gfl_ops._registry` (see its docstring for the interface)."""

    name = "triton"

    def unavailable_reason(self, device_type: str) -> str | None:
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device (torch.cuda.is_available() is False)"
            return None
        if device_type == "cpu":
            if not env_interpret_requested():
                return ("Triton runs on CPU tensors only under its interpreter: set "
                        "TRITON_INTERPRET=1 before triton is imported")
            if not _common.is_interpreted():
                return ("TRITON_INTERPRET=1 was set after gfl_ops.triton was imported, so its "
                        "kernels are compiled for the GPU; set it before importing triton")
            return None
        return f"Triton kernels do not run on {device_type} tensors"

    def qfl(self, pred, labels, scores, beta, activated):
        pred, scores = _kernel_dtype(pred), _kernel_dtype(scores)
        if labels.dtype not in LABEL_DTYPES:
            labels = labels.long()
        if _fused(pred):
            return qfl_fwd_fused(pred, labels, scores, float(beta), bool(activated))[0]
        return qfl_fwd(pred, labels, scores, float(beta), bool(activated))

    def qfl_dense(self, pred, target, beta, activated):
        pred, target = _kernel_dtype(pred), _kernel_dtype(target)
        if _fused(pred):
            return qfl_dense_fwd_fused(pred, target, float(beta), bool(activated))[0]
        return qfl_dense_fwd(pred, target, float(beta), bool(activated))

    def dfl(self, pred, target):
        pred, target = _kernel_dtype(pred), _kernel_dtype(target)
        if _fused(pred):
            return dfl_fwd_fused(pred, target)[0]
        return dfl_fwd(pred, target)

    def integral(self, pred):
        orig_dtype = pred.dtype
        pred = _kernel_dtype(pred)
        out = integral_fwd_fused(pred)[0] if _fused(pred) else integral_fwd(pred)
        return out.to(orig_dtype)


BACKEND = TritonBackend()
