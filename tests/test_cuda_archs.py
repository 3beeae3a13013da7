"""Which GPUs the compiled CUDA kernels run on (gfl_ops/_cuda_archs.py), and what happens on one
they do not: the CUDA rules for SASS and PTX compatibility, the build's default arch list grown
for the GPUs a build machine shows, and the backend choice passing over the CUDA kernels with a
reason that names the GPU and the rebuild (no GPU needed: torch.cuda is stood in for)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import gfl_ops
from gfl_ops import _cpp_backend, _cuda_archs, _extension, _registry

DEFAULT = (("80", "90"), ("90",))  # setup.py's 8.0;9.0+PTX


@pytest.mark.parametrize(
    "capability, runs",
    [
        ((7, 0), False),  # V100
        ((7, 5), False),  # T4
        ((8, 0), True),  # A100
        ((8, 6), True),  # RTX 3090, A10: sm_80 SASS, same major
        ((8, 9), True),  # L4, RTX 4090
        ((9, 0), True),  # H100, H200
        ((10, 0), True),  # B200: compute_90 PTX, JIT
        ((12, 0), True),  # RTX 5090
    ],
)
def test_default_build_runs_on(capability, runs):
    assert _cuda_archs.runs_on(capability, *DEFAULT) is runs


def test_compatibility_rules():
    runs_on = _cuda_archs.runs_on
    assert not runs_on((8, 0), ("86",), ())  # SASS runs on the same or a newer minor only
    assert not runs_on((9, 0), ("80", "89"), ())  # never across majors
    assert runs_on((8, 9), (), ("80",))  # PTX JITs forward
    assert not runs_on((7, 5), (), ("80",))  # but not backward
    assert runs_on((9, 0), ("90a",), ()) and not runs_on((10, 0), ("90a",), ())
    assert not runs_on((10, 0), (), ("90a",))  # arch-specific PTX: that capability only


def test_targets_from_torch_gencode_flags():
    flags = [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=compute_90",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    assert _cuda_archs.targets_from_gencode(flags) == (("80", "90", "90a"), ("90",))


def test_default_arch_list_grows_for_the_gpus_a_build_machine_shows():
    extend = _cuda_archs.extend_arch_list
    base = "8.0;9.0+PTX"
    assert extend(base, [(9, 0), (8, 9), (12, 0)], *DEFAULT) == base
    assert extend(base, [(7, 5), (7, 5), (8, 0)], *DEFAULT) == base + ";7.5"


@pytest.fixture
def visible_gpu(monkeypatch):
    """Stand in for torch.cuda with one visible GPU of a chosen capability, and for a CUDA build
    recorded with the default targets."""

    def show(capability: tuple[int, int], name: str):
        record = types.SimpleNamespace(
            TORCH_VERSION=str(torch.__version__),
            TORCH_CUDA=torch.version.cuda,
            CUDA_SASS=DEFAULT[0],
            CUDA_PTX=DEFAULT[1],
        )
        monkeypatch.setitem(sys.modules, "gfl_ops._build_info", record)
        monkeypatch.setattr(gfl_ops, "_build_info", record, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
        monkeypatch.setattr(_extension, "cuda_compiled", lambda: True)
        monkeypatch.setattr(_cpp_backend, "cuda_compiled", lambda: True)
        _cuda_archs.unrunnable_reason.cache_clear()
        monkeypatch.setattr(_registry, "_resolved", {})
        monkeypatch.setattr(_registry, "_warned_fallback", set())

    yield show
    _cuda_archs.unrunnable_reason.cache_clear()


def test_cuda_backend_passes_over_a_gpu_the_build_has_no_code_for(visible_gpu):
    if not _extension.extension_loaded():
        pytest.skip(f"gfl_ops._C not loaded: {_extension.extension_error()}")
    visible_gpu((7, 5), "Tesla T4")
    reason = gfl_ops.backend_status("cuda")["cuda"]
    assert "none of which runs on cuda:0 (Tesla T4, compute capability 7.5)" in reason
    assert "SASS for sm_80, sm_90 and PTX for compute_90" in reason
    assert 'TORCH_CUDA_ARCH_LIST="7.5"' in reason
    # the automatic choice takes another backend; asking for this one is a clear error
    assert _registry._auto_choice("cuda", "qfl") in ("triton", "reference")
    with pytest.raises(RuntimeError, match="cannot run on cuda tensors here: gfl_ops._C holds"):
        _registry._resolve_name("cuda", "cuda", "qfl")


def test_cuda_backend_stays_on_a_gpu_the_build_covers(visible_gpu):
    if not _extension.extension_loaded():
        pytest.skip(f"gfl_ops._C not loaded: {_extension.extension_error()}")
    visible_gpu((8, 9), "NVIDIA L4")
    assert gfl_ops.backend_status("cuda")["cuda"] == "available"


def test_report_says_which_gpus_the_kernels_cover(visible_gpu):
    """``python -m gfl_ops`` (gfl_ops/__main__.py) names each GPU and whether the CUDA kernels
    run on it, and what the automatic choice will run there."""
    if not _extension.extension_loaded():
        pytest.skip(f"gfl_ops._C not loaded: {_extension.extension_error()}")
    from gfl_ops import __main__ as diagnose

    visible_gpu((7, 5), "Tesla T4")
    text = diagnose.report()
    assert "GPU cuda:0: Tesla T4, compute capability 7.5: the CUDA kernels DO NOT run on it" in text
    assert "qfl -> cuda" not in text.split("backends for cuda tensors:")[1]
    _cuda_archs.unrunnable_reason.cache_clear()
    visible_gpu((9, 0), "NVIDIA H100 80GB HBM3")
    text = diagnose.report()
    assert "compute capability 9.0: the CUDA kernels run on it" in text
    assert "qfl -> cuda, qfl_dense -> cuda, dfl -> cuda, integral -> cuda" in text
