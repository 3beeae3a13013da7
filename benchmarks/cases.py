"""Benchmark cases: the sizes (from real detectors), the presets, and the inputs of each case.

Sizes (issue #6):

* QFL: N anchors x C classes, N in {1k, 20k, 160k, 640k}, C in {20 (VOC), 80 (COCO),
  365 (Objects365)}; one 1333x800 image gives ~22k FPN points (P3-P7), a per-GPU batch of 2
  ~45k, so the core target 40,000 x 80 is one realistic training step's classification loss.
* DFL and the integral: M rows x n+1 bins, M in {1k, 64k, 640k}, n+1 in {8, 17 (reg_max=16,
  the GFL default), 33}; the core targets 32,000 x 17 and 160,000 x 17 too.

The inputs are built the way a detector hands them to the losses (see ``make_inputs``), so the
benchmark measures the call a detector makes, reduction included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

OPS = ("qfl", "dfl", "integral")
MODES = ("fwd", "fwd+bwd")
POS_FRACTION = 0.02  # share of positive anchors in the QFL cases (ATSS gives ~1-3%)
QFL_BETA = 2.0


@dataclass(frozen=True)
class Case:
    """One benchmark size of one operator.

    Attributes:
        op: 'qfl' | 'dfl' | 'integral'.
        rows: N anchors (QFL) or M rows (DFL, integral).
        cols: C classes (QFL) or n+1 bins (DFL, integral).
        core: True for the core issue's target cases (CPU, float32, forward+backward).
    """

    op: str
    rows: int
    cols: int
    core: bool = False

    @property
    def size(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def elements(self) -> int:
        return self.rows * self.cols


@dataclass
class Inputs:
    """One set of inputs of a case, in the canonical layout.

    Attributes:
        args: positional arguments of the op (see ``peers``): QFL (pred, labels, scores, weight,
            avg_factor), DFL (pred, target, weight, avg_factor), integral (pred,).
        pred: the tensor gradients flow to (``args[0]``).
        grad_out: for the integral's backward, the incoming gradient (the losses are scalars and
            are back-propagated with ``loss.backward()``).
    """

    args: tuple
    pred: torch.Tensor
    grad_out: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# presets

_K = 1000


def _grid(
    op: str,
    rows: Sequence[int],
    cols: Sequence[int],
    max_elements: float = math.inf,
    core: Sequence[tuple[int, int]] = (),
) -> list[Case]:
    sizes = {(r, c) for r in rows for c in cols if r * c <= max_elements} | set(core)
    return [Case(op, r, c, core=(r, c) in set(core)) for r, c in sorted(sizes)]


QFL_CORE = ((40 * _K, 80),)
ROWS_CORE = ((32 * _K, 17), (160 * _K, 17))

# The CPU grid is sized to run on this repository's 2-core machine in about 20 minutes.  The
# largest QFL sizes (N*C > 13M elements: 160k x 365, 640k x {80, 365}) take seconds per eager
# call there and are GPU-only.  DFL and the integral sweep M at 17 bins (the GFL default) and
# the bins at 64k and 640k rows; 1k x {8, 33} are GPU-only (they add nothing on a CPU).
_CPU_QFL_MAX_ELEMENTS = 13_000_000


def preset_cases(preset: str, device_type: str) -> list[Case]:
    """The cases of a preset.

    Args:
        preset: 'quick' (tiny sizes, seconds: smoke tests), 'core-targets' (the core issue's
            CPU target cases only), 'gpu-targets' (the large sizes of the GPU targets, M or
            N = 640k), 'full' (the issue's grid; trimmed on CPU, see above).
        device_type: 'cpu' or 'cuda'.
    """
    if preset == "quick":
        return [Case("qfl", 1 * _K, 20), Case("dfl", 1 * _K, 17), Case("integral", 1 * _K, 17)]
    if preset == "core-targets":
        return [Case("qfl", r, c, core=True) for r, c in QFL_CORE] + [
            Case(op, r, c, core=True) for op in ("dfl", "integral") for r, c in ROWS_CORE
        ]
    if preset == "gpu-targets":
        return [Case("qfl", 640 * _K, c) for c in (20, 80, 365)] + [
            Case(op, 640 * _K, b) for op in ("dfl", "integral") for b in (8, 17, 33)
        ]
    if preset != "full":
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if device_type == "cpu":
        qfl = _grid(
            "qfl",
            (1 * _K, 20 * _K, 160 * _K, 640 * _K),
            (20, 80, 365),
            _CPU_QFL_MAX_ELEMENTS,
            QFL_CORE,
        )
        rows_cases = [
            c
            for op in ("dfl", "integral")
            for c in _grid(op, (1 * _K, 64 * _K, 640 * _K), (17,), core=ROWS_CORE)
            + _grid(op, (64 * _K, 640 * _K), (8, 33))
        ]
        return qfl + sorted(rows_cases, key=lambda c: (c.op != "dfl", c.rows, c.cols))
    qfl = _grid("qfl", (1 * _K, 20 * _K, 160 * _K, 640 * _K), (20, 80, 365), core=QFL_CORE)
    rows_cases = [
        c
        for op in ("dfl", "integral")
        for c in _grid(op, (1 * _K, 64 * _K, 640 * _K), (8, 17, 33), core=ROWS_CORE)
    ]
    return qfl + rows_cases


PRESETS = ("quick", "core-targets", "gpu-targets", "full")


def is_large(case: Case) -> bool:
    """The large sizes of the GPU targets: the largest N (QFL) or M (DFL, integral)."""
    return case.rows >= 640 * _K


# --------------------------------------------------------------------------------------------
# inputs


def make_inputs(
    case: Case, dtype: torch.dtype, device: torch.device, requires_grad: bool, seed: int
) -> Inputs:
    """Random inputs of ``case`` shaped and distributed as a detector produces them.

    * QFL: logits ~ N(0, 1); 2% of anchors positive with a label uniform in [0, C) and an IoU
      score uniform in [0, 1), label C (background) elsewhere; ``weight`` = ones (mmdetection's
      ``label_weights``); ``avg_factor`` = number of positives as a Python float (the GFL head
      all-reduces it and calls ``.item()`` once, outside the loss).
    * DFL: logits ~ N(0, 1); targets uniform in [0, n - 0.1] (the head clamps to reg_max - 0.1);
      ``weight`` uniform per box, shared by its 4 side rows (the detached max class score of each
      positive, expanded to the sides as ``GFLHead`` does); ``avg_factor`` = 4.0,
      exactly as ``GFLHead`` calls it.
    * integral: logits ~ N(0, 1) and an incoming gradient ~ N(0, 1) for the backward.

    Targets, scores and weights are float32 whatever ``dtype`` is: detectors compute them from
    boxes in float32; only the network outputs (``pred``) take the benchmark dtype.
    """
    # generated on the device itself: the GPU cases reach 233M elements
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    rows, cols = case.rows, case.cols
    pred = randn(rows, cols).to(dtype).requires_grad_(requires_grad)
    if case.op == "qfl":
        num_pos = max(1, round(POS_FRACTION * rows))
        labels = torch.full((rows,), cols, dtype=torch.long, device=device)
        pos = torch.randperm(rows, generator=gen, device=device)[:num_pos]
        labels[pos] = torch.randint(0, cols, (num_pos,), generator=gen, device=device)
        scores = rand(rows)
        weight = torch.ones(rows, device=device)
        return Inputs((pred, labels, scores, weight, float(num_pos)), pred)
    if case.op == "dfl":
        n = cols - 1
        target = rand(rows) * (n - 0.1)
        # one weight per box, shared by its four sides (GFLHead expands it to the 4 rows)
        weight = rand((rows + 3) // 4).repeat_interleave(4)[:rows]
        return Inputs((pred, target, weight, 4.0), pred)
    if case.op == "integral":
        grad_out = randn(rows).to(dtype)
        return Inputs((pred,), pred, grad_out=grad_out)
    raise ValueError(f"unknown op {case.op!r}")


def input_bytes(inputs: Inputs) -> int:
    """Bytes of the tensors in one input set (what a rotation buffer holds)."""
    total = sum(a.numel() * a.element_size() for a in inputs.args if isinstance(a, torch.Tensor))
    if inputs.grad_out is not None:
        total += inputs.grad_out.numel() * inputs.grad_out.element_size()
    return total


def floor_bytes(case: Case, dtype: torch.dtype, mode: str) -> int:
    """Bytes moved by an ideal implementation: each input read once, each output written once.

    The reduced losses are 0-d (4 bytes); intermediates (e.g. the per-anchor loss) are not
    outputs and do not count.  ``fwd+bwd`` adds the gradient of ``pred`` (written once) and, for
    the integral, the incoming gradient (read once); ``pred`` is still counted once, since a
    fused forward can emit the gradient in the same pass.
    """
    elt = torch.empty((), dtype=dtype).element_size()
    pred = case.elements * elt
    grad = pred if mode == "fwd+bwd" else 0
    if case.op == "qfl":  # labels int64, scores and weight float32
        return pred + case.rows * (8 + 4 + 4) + 4 + grad
    if case.op == "dfl":  # target and weight float32
        return pred + case.rows * (4 + 4) + 4 + grad
    if case.op == "integral":  # output (M,) in pred's dtype; grad_out read in the backward
        out = case.rows * elt
        return pred + out + (out + grad if mode == "fwd+bwd" else 0)
    raise ValueError(f"unknown op {case.op!r}")


def autograd_floor_bytes(case: Case, dtype: torch.dtype, mode: str) -> int:
    """``floor_bytes`` plus what autograd's split into forward and backward forces on any
    exact implementation.

    The integral's output is (M,), so its backward gets an arbitrary incoming gradient only
    after the forward has run; each gradient element needs its row's softmax again, so the
    backward re-reads ``pred`` (or reads a per-element quantity the forward wrote, which costs
    at least as much): one more pass over ``pred``.  The losses reduce to a scalar, whose
    incoming gradient (1 for ``loss.backward()``) the forward can fold in, so their floor stays
    ``floor_bytes``.
    """
    base = floor_bytes(case, dtype, mode)
    if case.op == "integral" and mode == "fwd+bwd":
        return base + case.elements * torch.empty((), dtype=dtype).element_size()
    return base
