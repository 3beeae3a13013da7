"""Measure every provider on one case (op, size, dtype, mode): one row of results per provider.

The timing itself (``timing.py``) and the calls (``steps.py``) are elsewhere; here: the rotating
input copies, each provider's first call (compile time, float64 error of its forward), the
timed calls, the peak-memory call, and the derived columns (speed-ups against the eager and
compile peers of the same case, the memory-traffic floor).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import cases as cases_mod
from benchmarks import peers, timing
from benchmarks.cases import Case, Inputs
from benchmarks.steps import make_step


@dataclass
class Settings:
    """How one run measures (from the command line)."""

    device: torch.device
    preset: str
    budget_s: float  # CPU: timed seconds per provider per case (split over rounds)
    warmup_s: float  # CPU: warm-up seconds per provider per case (at least 2 calls)
    min_reps: int
    warmup_ms: float  # CUDA
    rep_ms: float  # CUDA
    cuda_timer: str
    rotate_bytes: int  # input copies cycled through, up to this many bytes
    max_sets: int
    memory: bool
    check: bool
    inputs: str = "reused"  # 'fresh' | 'reused': see benchmarks/steps.py


def _rotation_sets(case: Case, dtype: torch.dtype, mode: str, settings: Settings) -> list[Inputs]:
    """Enough copies of the inputs that cycling through them defeats the caches."""
    requires_grad = mode == "fwd+bwd"
    first = cases_mod.make_inputs(case, dtype, settings.device, requires_grad, seed=0)
    per_set = max(cases_mod.input_bytes(first), 1)
    n_sets = int(min(settings.max_sets, max(1, math.ceil(settings.rotate_bytes / per_set))))
    return [first] + [
        cases_mod.make_inputs(case, dtype, settings.device, requires_grad, seed=i)
        for i in range(1, n_sets)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _canonical(provider: peers.Provider, out: torch.Tensor) -> torch.Tensor:
    """A provider's forward output in the canonical layout (Ultralytics' integral is (1, 4, a)
    over rows ordered side-major; ours are (M,) ordered anchor-major)."""
    if provider.prepare is not None and out.dim() == 3:
        return out.reshape(4, -1).t().reshape(-1)
    return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().reshape(-1)
    ref = ref.detach().double().reshape(-1)
    if out.shape != ref.shape:
        return math.nan
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)
    return (out - ref).abs().max().item() / scale if ref.numel() else 0.0


def reference_output(op: str, inputs: Inputs) -> torch.Tensor:
    """The forward of the eager formulas in float64 on one input set: every provider's yardstick.

    The same for both modes (the inputs of a case and dtype do not depend on the mode), so
    ``bench_case`` computes it once per case and dtype (``reference_cache``)."""
    args = tuple(
        a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in inputs.args
    )
    with torch.no_grad():
        return peers.EAGER[op](*args)


def _time_steps(
    steps: dict[str, Callable[[], object]], settings: Settings, rows: dict[str, dict]
) -> dict[str, timing.Timing]:
    """Time the providers' steps; a provider that fails while timed is noted and dropped."""

    def one(name: str, step: Callable[[], object]) -> timing.Timing | None:
        try:
            if settings.device.type == "cuda":
                return timing.bench_cuda(
                    step,
                    warmup_ms=settings.warmup_ms,
                    rep_ms=settings.rep_ms,
                    timer=settings.cuda_timer,
                )
            return timing.bench_cpu(
                {name: step},
                budget_s=settings.budget_s,
                warmup_s=settings.warmup_s,
                min_reps=settings.min_reps,
                min_warmup=1,
            )[name]
        except Exception as exc:  # noqa: BLE001 - reported in the row, the run goes on
            rows[name]["notes"] = f"error while timed: {type(exc).__name__}: {exc}"[:240]
            steps.pop(name, None)
            return None

    if settings.device.type == "cpu" and len(steps) > 1:
        try:
            # interleaved; min_warmup=1: each provider has already made its first call
            return timing.bench_cpu(
                steps,
                budget_s=settings.budget_s,
                warmup_s=settings.warmup_s,
                min_reps=settings.min_reps,
                min_warmup=1,
            )
        except Exception:  # noqa: BLE001 - find the culprit by timing them one at a time
            pass
    results = {name: one(name, step) for name, step in list(steps.items())}
    return {name: t for name, t in results.items() if t is not None}


def bench_case(
    case: Case,
    dtype: torch.dtype,
    mode: str,
    providers: list[peers.Provider],
    settings: Settings,
    copy_bps: float,
    reference_cache: dict | None = None,
) -> list[dict]:
    """Measure every provider on one case; returns one row per provider (metadata excluded).

    ``reference_cache`` keeps the float64 reference output across the modes of a case."""
    device = settings.device
    sets = _rotation_sets(case, dtype, mode, settings)
    reference_out = None
    if settings.check:
        key = (case, dtype)
        if reference_cache is None or key not in reference_cache:
            if reference_cache is not None:
                reference_cache.clear()
            reference_out = reference_output(case.op, sets[0])
            if reference_cache is not None:
                reference_cache[key] = reference_out
        reference_out = reference_cache[key] if reference_cache is not None else reference_out

    rows: dict[str, dict] = {}
    steps: dict[str, Callable[[], object]] = {}
    prepared: dict[str, list[Inputs]] = {}
    for p in providers:
        row = {"provider": p.name, "notes": ""}
        rows[p.name] = row
        try:
            psets = [p.prepare(s) for s in sets] if p.prepare else list(sets)
            prepared[p.name] = psets
            step = make_step(p.fn, psets, mode, settings.inputs)
            _sync(device)
            t0 = time.perf_counter()
            out = step()  # first call, on set 0: compiles for the compile peer
            _sync(device)
            first = time.perf_counter() - t0
            if reference_out is not None:
                row["rel_err_fp64"] = _rel_err(_canonical(p, out), reference_out)
            del out
            if p.compiled:
                t0 = time.perf_counter()
                step()
                _sync(device)
                row["compile_s"] = max(first - (time.perf_counter() - t0), 0.0)
            steps[p.name] = step
        except Exception as exc:  # noqa: BLE001 - a failing provider is reported, not fatal
            row["notes"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            prepared.pop(p.name, None)

    # time
    for name, t in _time_steps(steps, settings, rows).items():
        rows[name].update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)

    # memory: one call each, after the timing (warm caches, compiled code loaded)
    elt = torch.empty((), dtype=dtype).element_size()
    grad_bytes = case.elements * elt
    for name, step in steps.items():
        rows[name]["grad_mb"] = grad_bytes / 2**20
        if not settings.memory:
            continue
        for s in prepared[name]:
            s.pred.grad = None  # freeing an old gradient inside the window would hide a buffer
        gc.collect()
        if hasattr(step, "prepare"):
            step.prepare()  # the fresh pred is the caller's memory, not the step's
        extra = timing.peak_extra_memory(step, device)
        if extra is not None:
            rows[name]["peak_extra_mb"] = extra / 2**20
            rows[name]["extra_per_grad"] = extra / grad_bytes

    # derived columns
    fbytes = cases_mod.floor_bytes(case, dtype, mode)
    floor_ms = fbytes / copy_bps * 1e3
    eager_ms = rows.get("eager", {}).get("median_ms")
    compile_ms = rows.get("compile", {}).get("median_ms")
    for row in rows.values():
        ms = row.get("median_ms")
        row.update(
            op=case.op,
            mode=mode,
            dtype=str(dtype).replace("torch.", ""),
            size=case.size,
            rows=case.rows,
            cols=case.cols,
            elements=case.elements,
            rotating_sets=len(sets),
            floor_bytes=fbytes,
            floor_ms=floor_ms,
            core_target=int(case.core and dtype == torch.float32 and mode == "fwd+bwd"),
        )
        if ms:
            row["speedup_vs_eager"] = eager_ms / ms if eager_ms else None
            row["speedup_vs_compile"] = compile_ms / ms if compile_ms else None
            row["time_over_floor"] = ms / floor_ms
            row["achieved_gbps"] = fbytes / (ms / 1e3) / 1e9
            row["frac_copy_bw"] = floor_ms / ms

    del sets, prepared, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())
