"""Timing, peak-memory and copy-bandwidth measurement.

CPU: ``time.perf_counter`` around each call, after a warm-up, with the providers of one case
interleaved round by round (so a burst of load from another process on a shared machine hits
all of them alike rather than one), Python's garbage collector paused; median and p20/p80 of
the per-call times.

CUDA: the method of ``triton.testing.do_bench``: before each repetition the L2 cache is flushed
by zeroing a 256 MB buffer, then a CUDA event pair brackets the call; the warm-up and the number
of repetitions are chosen by time (25 ms / 100 ms by default); median and p20/p80 of the event
times.  ``timer='triton'`` calls ``triton.testing.do_bench`` itself instead.

In both, the callable cycles through several copies of the inputs (see ``measure_case.py``), so
a small case cannot be served from a cache warmed by the previous repetition.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Per-call times of one provider on one case, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _summarise(samples_s: list[float]) -> Timing:
    t = torch.tensor(samples_s, dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(float(q[0]), float(q[1]), float(q[2]), len(samples_s))


class _GcPaused:
    """Pause Python's cyclic garbage collector (a collection inside a timed call is noise)."""

    def __enter__(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was_enabled:
            gc.enable()


def bench_cpu(
    fns: Mapping[str, Callable[[], object]],
    *,
    budget_s: float = 0.6,
    warmup_s: float = 0.1,
    min_reps: int = 5,
    max_reps: int = 200,
    rounds: int = 5,
    min_warmup: int = 2,
) -> dict[str, Timing]:
    """Time several callables side by side on the CPU.

    Each callable is warmed up (at least ``min_warmup`` calls and ``warmup_s``), its per-call time
    estimated, and given ``budget_s / estimate`` repetitions clamped to [min_reps, max_reps].
    The repetitions are spread over ``rounds`` rounds; in each round every callable runs its
    share, the starting callable rotating from round to round.
    A callable with a ``prepare`` attribute (a fresh-input step, benchmarks/steps.py) has it
    called before every timed call, outside the timing.

    Returns:
        name -> Timing.
    """
    estimates: dict[str, float] = {}
    with _GcPaused():
        for name, fn in fns.items():
            start = time.perf_counter()
            calls = 0
            last = math.inf
            prepare = getattr(fn, "prepare", None)
            while calls < min_warmup or (time.perf_counter() - start < warmup_s and calls < 50):
                if prepare is not None:
                    prepare()
                t0 = time.perf_counter()
                fn()
                last = time.perf_counter() - t0
                calls += 1
            estimates[name] = last
        reps = {
            name: int(min(max_reps, max(min_reps, math.ceil(budget_s / max(est, 1e-9)))))
            for name, est in estimates.items()
        }
        samples: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                fn = fns[name]
                prepare = getattr(fn, "prepare", None)
                # this round's share of the repetitions (the last round takes the remainder)
                share = (reps[name] * (r + 1)) // rounds - (reps[name] * r) // rounds
                for _ in range(share):
                    if prepare is not None:
                        prepare()
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - t0)
    return {name: _summarise(s) for name, s in samples.items()}


_L2_FLUSH_BYTES = 256 * 1024 * 1024


def bench_cuda(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    timer: str = "events",
    min_reps: int = 10,
    max_reps: int = 1000,
) -> Timing:
    """Time ``fn`` on the current CUDA device.

    Args:
        fn: the callable (launches work on the current stream).
        warmup_ms, rep_ms: time spent warming up / measuring, as in ``do_bench``.
        timer: 'events' (this module's do_bench-equivalent, which also reports the number of
            repetitions) or 'triton' (``triton.testing.do_bench``; reps reported as -1).
    """
    if timer == "triton":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q[0]), float(q[1]), float(q[2]), -1)
    if timer != "events":
        raise ValueError(f"timer must be 'events' or 'triton', got {timer!r}")
    cache = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    with _GcPaused():
        fn()
        torch.cuda.synchronize()
        # estimate the time of one call, as do_bench does
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            cache.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
        n_warmup = max(1, int(warmup_ms / estimate_ms))
        n_repeat = int(min(max_reps, max(min_reps, rep_ms / estimate_ms)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
        for _ in range(n_warmup):
            fn()
        prepare = getattr(fn, "prepare", None)  # a fresh-input step: untimed set-up
        for i in range(n_repeat):
            cache.zero_()  # flush L2 so no repetition reads what the previous one left there
            if prepare is not None:
                prepare()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
    del cache
    return _summarise([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: Kineto logs every profiler start/stop there
    unconditionally (KINETO_LOG_LEVEL does not silence it).  Python exceptions still propagate
    and are printed after the descriptor is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call
    (the caching allocator's tensor bytes; cached-but-free blocks do not count).

    CPU: the running total of the allocations and frees that c10's CPU allocator reports to
    ``torch.profiler`` (``profile_memory=True``) during the call, at its maximum.  This sees
    every tensor allocated through ATen -- eager ops, autograd buffers, Inductor's generated
    code, C++ kernels -- but not memory taken outside it (thread stacks, a kernel's own
    ``malloc``).  Returns None when the profiler reports no memory events.

    What remains allocated after the call (e.g. ``pred.grad``) counts: it is extra memory the
    step needs.  The outputs of ``fn`` are dropped before returning.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return int(peak - base)
    from torch.profiler import ProfilerActivity, profile

    with (
        _stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        return None
    events.sort(key=lambda e: e.start_ns())
    cpu = torch._C._autograd.DeviceType.CPU
    current = peak = 0
    for e in events:
        if e.device_type() != cpu:
            continue
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


def copy_bandwidth(
    device: torch.device, nbytes: int | None = None, timer: str = "events", budget_s: float = 0.5
) -> float:
    """Achievable memory bandwidth in bytes/s: ``dst.copy_(src)`` (read + write) of a buffer far
    larger than the caches, timed like the benchmarks.

    Args:
        nbytes: bytes per buffer; default 1 GiB on CUDA, 256 MiB on CPU.
        budget_s: CPU: seconds of timed copies.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        timing = bench_cuda(lambda: dst.copy_(src), timer=timer)
    else:
        timing = bench_cpu({"copy": lambda: dst.copy_(src)}, budget_s=budget_s, min_reps=5)["copy"]
    return 2 * nbytes / (timing.median_ms / 1e3)
