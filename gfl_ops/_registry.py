"""Backend selection: the ``backend=`` argument, else ``$GFL_OPS_BACKEND``, else automatic.

A backend is an object with four methods that return *unreduced*, autograd-aware losses:

* ``qfl(pred, labels, scores, beta, activated) -> (N,)``
* ``qfl_dense(pred, target, beta, activated) -> (N,)``
* ``dfl(pred, target) -> (M,)``
* ``integral(pred) -> (M,)`` for a 2-D ``pred`` of shape (M, n+1)

and ``unavailable_reason(device_type) -> str | None`` (``None`` when it can run on tensors of that
device type).  Validation, weighting and reduction are done once, in :mod:`gfl_ops.functional`.

Backends are imported lazily so that ``import gfl_ops`` never pays for Triton or fails because the
C++ extension is missing.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Protocol

import torch

BACKEND_NAMES = ("cpu", "cuda", "triton", "reference")
_ENV_VAR = "GFL_OPS_BACKEND"

# module path, attribute holding the backend object
_BACKEND_MODULES = {
    "reference": ("gfl_ops._reference_backend", "BACKEND"),
    "cpu": ("gfl_ops._cpp_backend", "CPU_BACKEND"),
    "cuda": ("gfl_ops._cpp_backend", "CUDA_BACKEND"),
    "triton": ("gfl_ops.triton", "BACKEND"),
}

# `auto` on CUDA tensors: which backend runs each op.  Until the GPU benchmarks have been run the
# CUDA C++ kernels are the default for every op (they need no JIT warm-up and are CUDA-graph
# friendly); benchmarks/README.md records the measurements this table must follow.
AUTO_CUDA_CHOICE = {"qfl": "cuda", "qfl_dense": "cuda", "dfl": "cuda", "integral": "cuda"}


class Backend(Protocol):
    name: str

    def unavailable_reason(self, device_type: str) -> str | None: ...
    def qfl(self, pred, labels, scores, beta: float, activated: bool) -> torch.Tensor: ...
    def qfl_dense(self, pred, target, beta: float, activated: bool) -> torch.Tensor: ...
    def dfl(self, pred, target) -> torch.Tensor: ...
    def integral(self, pred) -> torch.Tensor: ...


_loaded: dict[str, Any] = {}
_load_errors: dict[str, str] = {}


def _load(name: str) -> Any | None:
    """Import backend ``name``; ``None`` (and a remembered reason) when it cannot be imported."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    module_name, attr = _BACKEND_MODULES[name]
    try:
        backend = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = backend
    return backend


def _reason(name: str, device_type: str | None) -> str | None:
    backend = _load(name)
    if backend is None:
        return _load_errors[name]
    if device_type is None:
        for dev in ("cpu", "cuda"):
            if backend.unavailable_reason(dev) is None:
                return None
        return backend.unavailable_reason("cpu")
    return backend.unavailable_reason(device_type)


def backend_status(device_type: str | None = None) -> dict[str, str]:
    """Each backend's state: ``"available"`` or the reason it cannot run.

    Args:
        device_type: ``"cpu"`` or ``"cuda"`` to ask about tensors of that device; ``None`` asks
            whether the backend can run on any device of this machine.
    """
    return {name: (_reason(name, device_type) or "available") for name in BACKEND_NAMES}


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that can run here (optionally: on tensors of ``device_type``)."""
    return [name for name in BACKEND_NAMES if _reason(name, device_type) is None]


def resolve(backend: str | None, device: torch.device, op: str) -> Any:
    """The backend object that runs ``op`` on tensors on ``device``.

    Raises:
        ValueError: ``backend`` is not a known name.
        RuntimeError: the requested backend cannot run on this device here; the message lists
            the backends that can.
    """
    return _loaded[_resolve_name(backend, device.type, op)]


# Successful choices: (requested name, device type, op, AUTO_CUDA_CHOICE[op]) -> backend name.
# Resolving from scratch walks the availability probes of several backends, which with the cold
# caches of a training step costs ~15 us a call.  Every availability answer is fixed for the
# life of the process except the Triton backend's on CPU (it follows TRITON_INTERPRET), so that
# choice is not kept.
_resolved: dict[tuple, str] = {}
_REQUESTABLE = BACKEND_NAMES + ("auto",)


# Under torch.compile the choice is made once, eagerly, and baked into the graph as a constant:
# the imports, environment reads and availability probes behind it are not traceable.
@torch.compiler.assume_constant_result
def _resolve_name(backend: str | None, device_type: str, op: str) -> str:
    requested = backend if backend is not None else os.environ.get(_ENV_VAR) or "auto"
    if not isinstance(requested, str) or requested not in _REQUESTABLE:
        source = "backend" if backend is not None else f"${_ENV_VAR}"
        raise ValueError(
            f"{source} must be one of {', '.join(_REQUESTABLE)} or None, got {requested!r}"
        )
    key = (requested, device_type, op, AUTO_CUDA_CHOICE.get(op))
    name = _resolved.get(key)
    if name is not None:
        return name
    name = _auto_choice(device_type, op) if requested == "auto" else requested
    reason = _reason(name, device_type)
    if reason is not None:
        can = available_backends(device_type)
        raise RuntimeError(
            f"gfl_ops backend {name!r} cannot run on {device_type} tensors here: {reason}. "
            f"Backends that can: {', '.join(can) or 'none'}."
        )
    if not (name == "triton" and device_type == "cpu"):
        _resolved[key] = name
    return name


def _auto_choice(device_type: str, op: str) -> str:
    if device_type == "cuda":
        preferred = AUTO_CUDA_CHOICE[op]
        fallbacks = ("cuda", "triton", "reference")
    elif device_type == "cpu":
        preferred, fallbacks = "cpu", ("reference",)
    else:
        preferred, fallbacks = "reference", ()
    for name in (preferred, *fallbacks):
        if _reason(name, device_type) is None:
            if name == "reference" and preferred != "reference":
                _warn_slow_fallback(preferred, device_type)
            return name
    return "reference"


# device types whose automatic choice already warned that it fell back to the reference backend
_warned_fallback: set[str] = set()


def _warn_slow_fallback(preferred: str, device_type: str) -> None:
    """Once per device type: ``auto`` is running the eager reference formulas (same values, much
    slower) because the compiled backend cannot run: an extension compiled for another torch than
    the one installed since, or a GPU its CUDA code does not cover (with no Triton).  Silent,
    that would look like gfl_ops being slow."""
    if device_type in _warned_fallback:
        return
    _warned_fallback.add(device_type)
    warnings.warn(
        f"gfl_ops: the {preferred!r} backend cannot run on {device_type} tensors here "
        f"({_reason(preferred, device_type)}), so the automatic choice is the 'reference' "
        "backend: the same values from eager PyTorch formulas, without the fused kernels' "
        "speed.  Choose it knowingly with backend='reference' or GFL_OPS_BACKEND=reference.",
        stacklevel=2,
    )
