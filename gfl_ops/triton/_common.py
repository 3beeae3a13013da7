"""Pieces shared by the Triton kernels: dtypes, launch checks, block heuristics, row scaling.

Dtype policy (the same for the three operators):

* Storage dtypes fp16, bf16, fp32 and fp64 are read directly by the kernels.  The math runs in
  float32 for fp16/bf16/fp32 and in float64 for fp64 (Triton lowers ``exp``/``log``/``exp2``/
  ``log2``/``floor`` on fp64 to libdevice on NVIDIA GPUs, and the interpreter uses numpy), so
  ``gradcheck`` in float64 sees float64 arithmetic.  Any other floating dtype (float8, ...) is
  upcast to float32 by the backend before the call (a documented copy; autograd casts the
  gradient back).
* Per-row losses are float32 for fp16/bf16 predictions and ``pred.dtype`` otherwise; gradients
  and the integral are returned in ``pred.dtype``.

Launch policy: every kernel is launched only for a non-empty grid (N = 0 / C = 0 return at once),
row offsets are int64 (``pid.to(tl.int64) * BLOCK`` and int64 strides), no atomics (every output
element is written by exactly one program, and row sums use ``tl.sum`` in a fixed order, so
results are bitwise reproducible), and nothing reads a tensor value on the host.  Inputs are
read through their strides (non-contiguous and expanded tensors need no copy); outputs are always
fresh contiguous tensors: the caller's tensors are never written.
"""

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

# Gradient strategy for all three operators, the name the C++ backends use too
# (gfl_ops/_cpp_backend.py, per device); the reasoning is in gfl_ops/triton/__init__.py.
# False = forward writes only the loss and backward recomputes the gradient scaled by grad_output;
# True = when pred requires grad, forward also writes the unscaled gradient, which backward only
# scales by grad_output (``triton_scale_rows``).  Read at call time, so it can be switched at run
# time (torch.compile guards on it).
FUSED_GRAD = False

# Storage dtypes the kernels read directly; other floating dtypes are upcast to float32 first.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Integer label dtypes loaded directly; others (uint16/32/64) are converted to int64 first.
LABEL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Elements per program tile (rows x columns of one loop step) and per thread.  Compiled for
# sm_90 with Triton's bundled ptxas, the QFL kernel at 16 fp32 elements per thread needed 255
# registers and spilled (up to 156 bytes) in its general-beta variants; at 4 elements per thread
# (1024-element tiles over 8 warps) every variant fits without spills and several blocks share an
# SM, which a memory-bound kernel needs to keep enough loads in flight.  fp64 keeps 4 elements per
# thread over half the tile (twice the registers per value).
TILE_ELEMENTS = 1024
TILE_ELEMENTS_FP64 = 512
ELEMENTS_PER_THREAD = 4


def is_interpreted() -> bool:
    """Whether this module's kernels were created under ``TRITON_INTERPRET=1``.

    ``triton.jit`` decides at decoration time (module import) between a compiled and an
    interpreted kernel, so setting the variable later has no effect on kernels already defined.
    """
    return _KERNELS_INTERPRETED


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic (and of QFL/DFL losses): float64 for fp64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_opmath(dtype: torch.dtype) -> tl.dtype:
    """Triton dtype of the arithmetic for storage ``dtype`` (a ``tl.constexpr`` argument)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile_elements(dtype: torch.dtype) -> int:
    return TILE_ELEMENTS_FP64 if dtype == torch.float64 else TILE_ELEMENTS


def num_warps_for(tile: int) -> int:
    """Warps for a tile of ``tile`` elements: ELEMENTS_PER_THREAD per thread, 1 to 16 warps."""
    return max(1, min(16, tile // (32 * ELEMENTS_PER_THREAD)))


def split_float(value: float) -> tuple[float, float]:
    """``value`` as ``hi + lo`` with both parts exact in float32.

    Triton passes Python floats to kernels as float32; a float64 kernel rebuilds
    ``hi + lo`` in float64 (about 48 significant bits), so e.g. beta = 0.3 is not rounded to
    float32 before the float64 math.
    """
    with np.errstate(over="ignore"):
        hi = float(np.float32(value))
        lo = float(np.float32(value - hi)) if math.isfinite(hi) else 0.0
    return hi, lo


def check_launchable(t: torch.Tensor, op: str) -> None:
    """Raise a clear error when Triton cannot run on ``t``'s device (instead of a cryptic one)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if _KERNELS_INTERPRETED:
            return
        raise RuntimeError(
            f"gfl_ops triton {op}: CPU tensors run only under Triton's interpreter; set "
            "TRITON_INTERPRET=1 before triton / gfl_ops.triton is imported, or use a CUDA tensor"
        )
    raise RuntimeError(
        f"gfl_ops triton {op}: tensors on {t.device.type} are not supported "
        "(cuda, or cpu under TRITON_INTERPRET=1)"
    )


def launch_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context for launching a kernel on ``t``'s device.

    * CUDA: make ``t``'s GPU the current device, since Triton launches on the current device and
      stream (a tensor on cuda:1 with cuda:0 current would otherwise be read from the wrong GPU).
    * Interpreter: numpy would warn where the GPU silently follows IEEE rules (log(0) = -inf,
      overflow to inf when rounding to fp16); silence those warnings so that interpreter runs
      behave like GPU runs.
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if _KERNELS_INTERPRETED:
        return np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore")
    return contextlib.nullcontext()


@triton.jit
def row_ids(pid, BLOCK: tl.constexpr):
    """Indices of the BLOCK rows of program ``pid``, as int64 so that row * stride offsets do not
    wrap past 2**31 elements (tensors of more than 2**31 elements, or huge strides)."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@dataclass(frozen=True)
class RowConfig:
    """Launch configuration of a row-blocked kernel: a BLOCK_ROWS x BLOCK_COLS tile per step."""

    block_rows: int
    block_cols: int
    num_warps: int

    def grid(self, rows: int) -> tuple[int]:
        return (triton.cdiv(rows, self.block_rows),)


def row_block(cols_per_step: int, rows: int, dtype: torch.dtype) -> RowConfig:
    """Rows per program for a tile ``cols_per_step`` wide: fill the tile, but no more rows than
    the (power-of-two rounded) problem has, so tiny problems do not compute masked rows."""
    tile = tile_elements(dtype)
    block_rows = max(1, tile // cols_per_step)
    block_rows = min(block_rows, triton.next_power_of_2(max(rows, 1)))
    return RowConfig(block_rows, cols_per_step, num_warps_for(block_rows * cols_per_step))


# --------------------------------------------------------------------------------------------
# Row scaling: out[r, k] = grad[r, k] * scale[r]; the backward of the fused-gradient mode.
# --------------------------------------------------------------------------------------------


@triton.jit
def _scale_rows_kernel(
    grad_ptr,
    scale_ptr,
    out_ptr,
    R,
    K,
    stride_scale,
    CDT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = row_ids(tl.program_id(0), BLOCK_R)
    row_mask = rows < R
    scale = tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0.0).to(CDT)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        offs = rows[:, None] * K + cols[None, :]
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(CDT)
        tl.store(out_ptr + offs, (g * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


_KERNELS_INTERPRETED = type(_scale_rows_kernel).__name__ == "InterpretedFunction"


@torch.library.custom_op("gfl_ops::triton_scale_rows", mutates_args=())
def scale_rows(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad * scale[:, None]`` in the opmath dtype, returned in ``grad.dtype``.

    Args:
        grad: (R, K) contiguous gradient saved by a fused forward (ours, never the caller's).
        scale: (R,) upstream gradient of the per-row loss, any float dtype and stride (the
            upstream gradient of ``loss.sum()`` is an expanded tensor with stride 0).
    """
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    if grad.numel() == 0:
        return out
    check_launchable(grad, "scale_rows")
    grad = grad.contiguous()  # a no-op for the buffers our forwards save
    rows, cols = grad.shape
    block_k = min(triton.next_power_of_2(cols), 512)
    cfg = row_block(block_k, rows, grad.dtype)
    with launch_guard(grad):
        _scale_rows_kernel[cfg.grid(rows)](
            grad,
            scale,
            out,
            rows,
            cols,
            scale.stride(0),
            CDT=tl_opmath(grad.dtype),
            BLOCK_R=cfg.block_rows,
            BLOCK_K=cfg.block_cols,
            num_warps=cfg.num_warps,
        )
    return out


@scale_rows.register_fake
def _(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _scale_rows_backward(ctx, grad_out):
    # Only reached under double backward; the fused path is a first-order gradient.
    raise RuntimeError("gfl_ops triton: double backward is not supported")


scale_rows.register_autograd(_scale_rows_backward)


def env_interpret_requested() -> bool:
    """``TRITON_INTERPRET`` as the registry contract reads it (exactly ``"1"``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# Autograd of the forward operators: one helper for every Triton op family.
# --------------------------------------------------------------------------------------------


def loss_and_grad_like(pred: torch.Tensor, with_grad: bool, loss_dtype: torch.dtype):
    """Fake outputs of a forward operator: (loss (N,), gradient like pred or an empty (0,))."""
    loss = pred.new_empty(pred.shape[0], dtype=loss_dtype)
    if not with_grad:
        return loss, pred.new_empty(0)
    return loss, torch.empty_like(pred, memory_format=torch.contiguous_format)


def register_loss_autograd(kind: str, op, backward_op, n_tensors: int) -> None:
    """The autograd of one operator pair, with the C++ operators' vocabulary and strategy
    (csrc/autograd.cpp): ``op(pred, *targets, *params, with_grad) -> (loss, workspace)`` and
    ``backward_op(grad_loss, pred, *targets, *params) -> grad``.

    With ``with_grad`` (the fused strategy, ``FUSED_GRAD``) the backward scales the workspace
    (dloss/dpred per unit of incoming gradient) by the incoming gradient (``scale_rows``); without
    it, or under create_graph (the workspace is a constant with no second-order term), it
    recomputes with ``backward_op``, whose own derivative is registered here too (double
    backward, gfl_ops/_second_order.py).  Only ``pred`` gets a gradient: targets are constants
    (gfl_ops.functional sends targets that require grad to the reference backend).

    Args:
        kind: 'qfl' | 'qfl_dense' | 'dfl' | 'integral' (the second-order formula).
        op, backward_op: the ``torch.library.custom_op`` pair.
        n_tensors: how many leading arguments of ``op`` are tensors (pred and the targets); the
            rest up to ``with_grad`` are constants handed to ``backward_op`` unchanged.
    """
    from gfl_ops._second_order import register_gradient_autograd

    def setup_context(ctx, inputs, output):
        *args, with_grad = inputs
        ctx.params = tuple(args[n_tensors:])
        ctx.nones = (None,) * (len(inputs) - 1)
        ctx.with_grad = with_grad
        # the workspace never receives a gradient (else autograd zero-fills one per backward)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        tensors = tuple(args[:n_tensors])
        ctx.save_for_backward(*(tensors + (output[1],) if with_grad else tensors))

    def backward(ctx, grad_loss, _grad_of_workspace):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None, *ctx.nones)
        saved = ctx.saved_tensors
        tensors = saved[:n_tensors]
        if ctx.with_grad and not torch.is_grad_enabled():
            grad = scale_rows(saved[n_tensors], grad_loss)
        else:
            grad = backward_op(grad_loss, *tensors, *ctx.params)
        return (grad, *ctx.nones)

    op.register_autograd(backward, setup_context=setup_context)
    register_gradient_autograd(backward_op, kind)
