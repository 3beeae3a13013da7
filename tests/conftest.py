"""Test configuration shared by the whole suite.

* Triton's interpreter is switched on before anything imports triton when no GPU is present, so
  the ``triton`` backend runs (not skips) on CPU tensors in CI.
* Hypothesis profiles: ``ci`` (default; bounded examples, no deadline) and ``thorough``
  (``HYPOTHESIS_PROFILE=thorough``).
* ``backend_device``: every (backend, device) pair that can run here, so each test checks every
  backend on CPU tensors and, when a GPU is present, on CUDA tensors too; ``any_backend_device``
  adds the reference backend once per device type.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _backend_devices(with_reference: bool = False) -> list[tuple[str, str]]:
    import gfl_ops

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [
        (b, d)
        for d in devices
        for b in gfl_ops.available_backends(d)
        if with_reference or b != "reference"
    ]


BACKEND_DEVICES = _backend_devices()
ANY_BACKEND_DEVICES = _backend_devices(with_reference=True)


@pytest.fixture(
    scope="session", params=BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES]
)
def backend_device(request) -> tuple[str, str]:
    """(backend name, device type) of a fused backend that can run here."""
    return request.param


@pytest.fixture(
    scope="session",
    params=ANY_BACKEND_DEVICES,
    ids=[f"{b}-{d}" for b, d in ANY_BACKEND_DEVICES],
)
def any_backend_device(request) -> tuple[str, str]:
    """``backend_device`` and the reference backend, once per device type."""
    return request.param
