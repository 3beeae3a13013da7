"""The timed step of one provider on one case: on reused inputs, or on fresh ones as in training.

``reused``: the step cycles through a few input sets (enough bytes to defeat the caches) and
calls the op on the same ``pred`` tensors again and again, as microbenchmarks usually do.

``fresh`` (the CPU default): every call gets a ``pred`` that did not exist before, made by a
one-parameter "head" (``pred = logits * w`` with ``w`` a (cols,) vector of ones, so the values
are exactly the case's logits), and the op's gradient flows back into that head.  The timed
part is the op's forward and its backward (``torch.autograd.grad(loss, pred)``); making
``pred`` and the head's own backward run outside the timing, in ``prepare``.  This is what a
training step hands a loss: a new activation every step, a new gradient every step, and the
allocator churn of the rest of the network in between.  It matters on the CPU, where a new
multi-MB buffer may come from never-touched pages (a page fault per 4 KiB on first write): see
benchmarks/README.md, "Fresh inputs".  On CUDA torch's caching allocator hands back the same
blocks either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from benchmarks.cases import Inputs

INPUT_MODES = ("fresh", "reused")


def make_step(
    fn: Callable[..., torch.Tensor], sets: Sequence[Inputs], mode: str, inputs: str = "reused"
) -> Callable[[], object]:
    """The timed callable of one provider (see the module docstring).

    Args:
        fn: the provider's op; called as ``fn(*inputs.args)``.
        sets: input sets to cycle through (already in the provider's layout).
        mode: 'fwd' or 'fwd+bwd'.
        inputs: 'reused' or 'fresh'.

    Returns:
        A callable returning the op's output.  A fresh step also has ``prepare()``, which the
        timer calls (untimed) before each timed call; without it the call prepares itself.
    """
    if inputs == "fresh":
        return FreshStep(fn, sets, mode)
    if inputs != "reused":
        raise ValueError(f"inputs must be one of {INPUT_MODES}, got {inputs!r}")
    cycle = itertools.cycle(sets)
    if mode == "fwd":

        def step_fwd() -> object:
            return fn(*next(cycle).args)

        return step_fwd

    def step_fwd_bwd() -> object:
        s = next(cycle)
        s.pred.grad = None  # every provider pays for allocating a fresh gradient
        out = fn(*s.args)
        if s.grad_out is None:
            out.backward()
        else:
            out.backward(s.grad_out)
        return out

    return step_fwd_bwd


class FreshStep:
    """A step whose ``pred`` is new on every call and whose gradient flows into a head."""

    def __init__(self, fn: Callable[..., torch.Tensor], sets: Sequence[Inputs], mode: str):
        self.fn = fn
        self.sets = itertools.cycle(sets)
        self.backward = mode == "fwd+bwd"
        first = sets[0].pred
        if sets[0].args[0] is not first:
            raise ValueError("a fresh step needs pred as the op's first argument")
        # one weight per column (class or bin, or the anchors of a channel-first layout): the
        # cheapest head with a real backward; ones keep pred's values exact in every dtype
        self.weight = torch.ones(
            first.shape[-1], dtype=first.dtype, device=first.device, requires_grad=self.backward
        )
        self._ready: tuple[Inputs, torch.Tensor] | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare(self) -> None:
        """Untimed: finish the previous step's backward into the head, make the next pred."""
        self._finish()
        s = next(self.sets)
        with torch.set_grad_enabled(self.backward):
            pred = s.pred.detach() * self.weight
        self._ready = (s, pred)

    def _finish(self) -> None:
        if self._pending is not None:
            pred, grad = self._pending
            self._pending = None
            pred.backward(grad)
            self.weight.grad = None

    def __call__(self) -> object:
        if self._ready is None:
            self.prepare()
        s, pred = self._ready
        self._ready = None
        out = self.fn(pred, *s.args[1:])
        if self.backward:
            (grad,) = torch.autograd.grad(out, pred, s.grad_out)
            self._pending = (pred, grad)
        return out
