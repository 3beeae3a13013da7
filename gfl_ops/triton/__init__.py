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

* ``triton_qfl`` / ``triton_qfl_dense`` / ``triton_dfl`` / ``triton_integral``: the C++
  operators' vocabulary and strategy (csrc/ops.cpp, csrc/autograd.cpp): ``(…, with_grad) ->
  (loss, workspace)``; with ``with_grad`` the forward also writes the unscaled gradient and the
  backward scales it (``triton_scale_rows``), without it the backward recomputes through the
  matching ``*_backward`` op.  One helper registers every pair's autograd
  (``_common.register_loss_autograd``).

Fused forward or recompute in backward (``gfl_ops.triton._common.FUSED_GRAD``, default
``False`` = recompute).  Counting bytes for QFL with (labels, scores) targets on N×C logits:

* recompute: forward reads N·C; backward reads N·C and writes N·C -> 3 N·C moved;
* fused: forward reads N·C and writes an N·C gradient; backward reads it and writes N·C ->
  4 N·C moved, plus an N·C buffer held from forward to backward (on top of the activations).

With a dense (N, C) target both come to 5 N·C (recompute reads the target twice), and the fused
buffer is still extra memory.  By a rough estimate (not a measurement) of 30-40 ALU and 4-5 MUFU
instructions per QFL element, fp32 inputs on an H100-class GPU are memory-bound, so recompute
should win by about the 4:3 byte ratio; with fp16/bf16 storage the bytes halve while the math
does not, so the recomputed transcendentals may cost as much as the bytes saved, which is where
fused could win.  DFL and the integral move M·(n+1) elements with one exp each: the same count
applies.  Recompute is the default because it is never worse in bytes and holds no extra memory;
the switch is a module constant read at call time (``torch.compile`` guards on it) so the GPU
benchmarks of issue #7 can settle it by measurement.  Both paths are tested.

Block sizes come from heuristics, not ``triton.autotune``: the QFL row sum is reduced in an order
that depends on the columns per step, so a timing-based choice could differ between processes
and break bitwise reproducibility; a heuristic also costs nothing under the interpreter and in
CUDA-graph capture.  See :func:`gfl_ops.triton.qfl.qfl_block_c` (C = 1, 20, 80, 365, 1203 ->
1, 32, 16, 128, 256 columns per step) and :func:`gfl_ops.triton.dfl.bins_config` (n+1 = 8, 17,
33 -> 8, 32, 64 columns); rows per program fill a 2048-element tile (1024 for fp64).

Behaviour on unusual values (no host synchronisation is spent on checks): QFL labels outside
[0, C) are background; DFL targets are clamped to [0, n] in the kernel and a NaN target gives a
NaN loss and gradient row.  Inputs are read through their strides (non-contiguous and expanded
tensors need no copy); outputs are fresh tensors, the caller's tensors are never written.
Double backward is exact (:mod:`gfl_ops._second_order`); third order raises.  Dtypes: see
:mod:`gfl_ops.triton._common`.
"""

from __future__ import annotations

import functools

import torch

if not hasattr(torch.library, "custom_op"):  # the registry reports this as the reason
    raise ImportError(
        f"the triton backend registers its kernels with torch.library.custom_op, which torch "
        f"{torch.__version__} lacks; it needs torch >= 2.6 (Triton >= 3.2)"
    )

from gfl_ops.triton import _common  # noqa: E402
from gfl_ops.triton import dfl as _dfl
from gfl_ops.triton import integral as _integral
from gfl_ops.triton import qfl as _qfl
from gfl_ops.triton._common import KERNEL_DTYPES, LABEL_DTYPES, env_interpret_requested

__all__ = ["BACKEND", "TritonBackend"]


# The oldest Triton this backend is verified with (scripts/check_torch_compat.sh; README,
# "Building"): under torch 2.4 / 2.5 (Triton 3.0 / 3.1) the interpreter returned outputs the
# kernels never wrote, and wrong values are worse than a backend that says it cannot run.
MIN_TRITON = "3.2"


@functools.cache  # the installed Triton does not change while the process runs
def _triton_too_old() -> str | None:
    import triton
    from torch.torch_version import TorchVersion  # torch's version comparison, for any package

    if TorchVersion(triton.__version__) < MIN_TRITON:
        return (
            f"Triton {triton.__version__} is older than {MIN_TRITON}, the "
            "oldest this backend is verified with (under 3.0 and 3.1 it returned outputs its "
            "kernels never wrote); upgrade torch (and with it Triton), or use the cuda / cpu / "
            "reference backend"
        )
    return None


def _kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """Floating dtypes the kernels cannot read (float8, ...) are upcast to float32 (a copy)."""
    return t if t.dtype in KERNEL_DTYPES else t.float()


def _fused(pred: torch.Tensor) -> bool:
    return _common.FUSED_GRAD and pred.requires_grad and torch.is_grad_enabled()


class TritonBackend:
    """Backend object for :mod:`gfl_ops._registry` (see its docstring for the interface)."""

    name = "triton"

    def unavailable_reason(self, device_type: str) -> str | None:
        too_old = _triton_too_old()
        if too_old is not None:
            return too_old
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device (torch.cuda.is_available() is False)"
            return None
        if device_type == "cpu":
            if not env_interpret_requested():
                return (
                    "Triton runs on CPU tensors only under its interpreter: set "
                    "TRITON_INTERPRET=1 before triton is imported"
                )
            if not _common.is_interpreted():
                return (
                    "TRITON_INTERPRET=1 was set after gfl_ops.triton was imported, so its "
                    "kernels are compiled for the GPU; set it before importing triton"
                )
            return None
        return f"Triton kernels do not run on {device_type} tensors"

    def qfl(self, pred, labels, scores, beta, activated):
        pred, scores = _kernel_dtype(pred), _kernel_dtype(scores)
        if labels.dtype not in LABEL_DTYPES:
            labels = labels.long()
        return _qfl.qfl(pred, labels, scores, float(beta), bool(activated), _fused(pred))[0]

    def qfl_dense(self, pred, target, beta, activated):
        pred, target = _kernel_dtype(pred), _kernel_dtype(target)
        return _qfl.qfl_dense(pred, target, float(beta), bool(activated), _fused(pred))[0]

    def dfl(self, pred, target):
        pred, target = _kernel_dtype(pred), _kernel_dtype(target)
        return _dfl.dfl(pred, target, _fused(pred))[0]

    def integral(self, pred):
        orig_dtype = pred.dtype
        pred = _kernel_dtype(pred)
        return _integral.integral(pred, _fused(pred))[0].to(orig_dtype)


BACKEND = TritonBackend()
