"""What a user meets at ``pip install``: gfl_ops._C is compiled against *their* torch.

A plain ``pip install`` builds in an isolated environment; the in-tree backend
(build_backend/torch_matched_build.py) finds the torch of the environment being installed into
and compiles against it, instead of whatever torch the index would put in the build
environment.  The end-to-end test installs a copy of the checkout into a fresh virtual env as a
user does, with the index closed to everything but the build tools, so that a build asking for
its own torch fails outright.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))
import torch_matched_build  # noqa: E402  (the in-tree backend, as pip imports it)

sys.path.remove(str(ROOT / "build_backend"))


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 1800)
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


# ---------------------------------------------------------------------------------------------
# the backend's decisions, without a build


def test_backend_asks_for_no_torch_when_one_is_importable():
    assert torch_matched_build.get_requires_for_build_wheel() == ["ninja"]
    assert torch_matched_build.get_requires_for_build_editable() == ["ninja"]
    assert torch_matched_build.get_requires_for_build_sdist() == []


def test_backend_asks_for_a_torch_only_when_none_is_installed(monkeypatch):
    monkeypatch.setattr(torch_matched_build, "_torch_importable_here", lambda: False)
    monkeypatch.setattr(torch_matched_build, "installed_torch_site", lambda: None)
    assert torch_matched_build.get_requires_for_build_wheel() == ["ninja", "torch>=2.1"]
    assert torch_matched_build.get_requires_for_build_sdist() == ["torch>=2.1"]


def test_backend_finds_the_torch_that_pip_isolation_hides(tmp_path):
    """pip's default isolation runs the hooks in the target interpreter with PYTHONPATH pointing
    at a sitecustomize that drops the target's site-packages (and the build environment's own
    setuptools in their place); the probe must see past it to the target's torch."""
    import setuptools

    isolation = tmp_path / "isolation"
    isolation.mkdir()
    (isolation / "sitecustomize.py").write_text(
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
    )
    site = Path(setuptools.__file__).parents[1]
    for name in ("setuptools", "_distutils_hack", "pkg_resources"):
        if (site / name).exists():
            (isolation / name).symlink_to(site / name)
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'the emulated isolation leaks torch'\n"
        f"sys.path.insert(0, {str(ROOT / 'build_backend')!r})\n"
        "import torch_matched_build as backend\n"
        "print(backend.installed_torch_site())\n"
        "print(backend.get_requires_for_build_wheel())\n"
        "import torch\n"
        "print(torch.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(isolation), PYTHONNOUSERSITE="1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    found, requires, imported = result.stdout.strip().splitlines()
    assert found == str(Path(torch.__file__).parents[1])
    assert requires == "['ninja']"  # no torch asked of the build environment
    assert imported == torch.__file__  # and setup.py would import the target's torch


def test_backend_probe_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("GFL_OPS_BUILD_TORCH", "isolated")
    assert torch_matched_build.installed_torch_site() is None


def test_backend_ignores_a_torch_for_another_python(monkeypatch, tmp_path):
    """An activated env of another Python (VIRTUAL_ENV) cannot lend this build its torch."""
    other = tmp_path / "bin" / "python"
    other.parent.mkdir()
    other.write_text(
        '#!/bin/sh\necho \'{"site": "/elsewhere", "python": [2, 7]}\'\n', encoding="utf-8"
    )
    other.chmod(0o755)
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path))
    assert torch_matched_build._probe(str(other)) is None


# ---------------------------------------------------------------------------------------------
# the real thing: pip install of a clone into a fresh virtual env


# the files pip needs to build and install gfl-ops from source (pyproject names README.md)
BUILD_INPUTS = (
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "README.md",
    "build_backend",
    "csrc",
    "gfl_ops",
)


def _base_python() -> str:
    """An interpreter to make a fresh venv from (not this venv's own python: its venv would)."""
    return getattr(sys, "_base_executable", sys.executable)


@pytest.mark.slow
def test_plain_pip_install_compiles_against_the_installed_torch(tmp_path):
    """``pip install <checkout>`` with default isolation, into a venv that has this torch: the
    build environment gets only setuptools and ninja (the index offers nothing else), the
    extension loads, the wheel pins that torch and records it for the check at import."""
    # what a source install needs, as the checkout has it now, without its build products
    source = tmp_path / "gfl-ops"
    build_products = shutil.ignore_patterns("*.so", "_build_info.py", "__pycache__")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=build_products)
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)

    venv = tmp_path / "venv"
    _run([_base_python(), "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    # the user's torch: the version this checkout runs, from the same wheels / index
    pip = [python, "-m", "pip"]
    _run([*pip, "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}", "numpy"])
    wheelhouse = tmp_path / "wheelhouse"
    _run([*pip, "download", "--quiet", "--dest", str(wheelhouse), "setuptools>=77", "ninja"])
    env = dict(os.environ, GFL_OPS_CPU_ONLY="1", MAX_JOBS="2")
    env.pop("PYTHONPATH", None)
    install = _run(
        [*pip, "install", "-v", "--no-index", "--find-links", str(wheelhouse), str(source)],
        env=env,
        cwd=tmp_path,
    )
    assert "compiling against the installed torch" in install.stderr + install.stdout

    check = _run(
        [
            python,
            "-c",
            "import torch, gfl_ops, gfl_ops._build_info as b\n"
            "assert gfl_ops.extension_loaded(), gfl_ops.extension_error()\n"
            "print(b.TORCH_VERSION, b.TORCH_CUDA)\n"
            "x = torch.randn(6, 17, requires_grad=True)\n"
            "gfl_ops.distribution_focal_loss(x, torch.rand(6) * 16, backend='cpu').backward()\n"
            "import importlib.metadata as m\n"
            "print(m.requires('gfl-ops'))\n",
        ],
        env=env,
        cwd=tmp_path,
    )
    built, requires = check.stdout.strip().splitlines()
    assert built == f"{torch.__version__} {torch.version.cuda}"
    assert f"torch=={torch.__version__.split('+')[0]}" in requires


def test_sdist_carries_the_build_backend(tmp_path):
    """An sdist must hold the in-tree backend (pyproject's backend-path) or it cannot build."""
    code = (
        "import sys; sys.path.insert(0, 'build_backend'); import torch_matched_build as b; "
        f"print(b.build_sdist({str(tmp_path)!r}))"
    )
    result = _run([sys.executable, "-c", code], cwd=ROOT)
    sdist = tmp_path / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert "build_backend/torch_matched_build.py" in names
    assert "gfl_ops/_build_info.py" not in names
    assert "csrc/cuda/qfl_kernel.cuh" in names


# ---------------------------------------------------------------------------------------------
# setup.py's choice of CUDA toolkit


@pytest.fixture(scope="module")
def setup_py() -> dict:
    """setup.py's functions, without running setup()."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="gfl_ops_setup_under_test")


def test_setup_refuses_a_torch_older_than_the_sources_support(setup_py):
    """torch 2.0 gets one line that names it and the fix, not pages of compiler errors; the
    minimum is the one pip is told (the build backend's TORCH_REQUIREMENT)."""
    wanted = ".".join(map(str, setup_py["MIN_TORCH"]))
    assert torch_matched_build.TORCH_REQUIREMENT == f"torch>={wanted}"
    refusal = r"needs torch >= 2\.1; this environment has torch 2\.0\.1"
    with pytest.raises(SystemExit, match=refusal):
        setup_py["_require_supported_torch"](types.SimpleNamespace(__version__="2.0.1+cu117"))
    for version in ("2.1.2+cu121", "2.14.1", "3.0.0a0+git1234"):
        setup_py["_require_supported_torch"](types.SimpleNamespace(__version__=version))


def test_a_failed_cuda_compile_says_how_to_install_without_it(setup_py, monkeypatch, capsys):
    """Toolkits other than CI's nvcc 13.0 are not compiled with here: when the compile of a build
    with CUDA sources fails, the error is followed by the one-line way round it."""
    from setuptools import Distribution

    command_class = setup_py["_cmdclass"]()["build_ext"]

    def failing_compile(self):
        raise RuntimeError("Error compiling objects for extension")

    monkeypatch.setattr(command_class.__mro__[1], "run", failing_compile)
    for macros, hinted in (([("GFL_WITH_CUDA", None)], True), ([], False)):
        command = command_class(Distribution())
        command.extensions = [types.SimpleNamespace(define_macros=macros)]
        with pytest.raises(RuntimeError, match="Error compiling objects"):
            command.run()
        hint = "GFL_OPS_CPU_ONLY=1 pip install --no-cache-dir <gfl-ops>"
        assert (hint in capsys.readouterr().err) == hinted


def _toolkit(tmp_path: Path, release: str) -> str:
    """A CUDA_HOME whose bin/nvcc reports ``release``."""
    nvcc = tmp_path / f"cuda-{release}" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        f"echo 'Cuda compilation tools, release {release}, V{release}.1'\n"
    )
    nvcc.chmod(0o755)
    return str(nvcc.parents[1])


def _torch(cuda: str | None):
    return types.SimpleNamespace(__version__="2.14.1", version=types.SimpleNamespace(cuda=cuda))


def test_setup_builds_cuda_kernels_with_a_matching_toolkit(setup_py, tmp_path, monkeypatch):
    for name in ("GFL_OPS_CPU_ONLY", "FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    with_cuda, reason = setup_py["_cuda_config"](_torch("13.0"), _toolkit(tmp_path, "13.2"))
    assert with_cuda, reason


def test_setup_passes_over_a_toolkit_of_another_cuda_major(setup_py, tmp_path, monkeypatch):
    """torch's extension build refuses nvcc of another CUDA major version than torch's, which
    would fail the whole install (a system CUDA 13 beside a torch for CUDA 12, say): the CUDA
    kernels are left out with the reason, and FORCE_CUDA=1 still tries."""
    for name in ("GFL_OPS_CPU_ONLY", "FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    home = _toolkit(tmp_path, "13.0")
    with_cuda, reason = setup_py["_cuda_config"](_torch("12.6"), home)
    assert not with_cuda
    assert f"nvcc 13.0 at {home} is not torch's CUDA 12.6" in reason
    assert "CUDA 12.x toolkit" in reason
    monkeypatch.setenv("FORCE_CUDA", "1")
    assert setup_py["_cuda_config"](_torch("12.6"), home)[0]


def test_setup_without_nvcc_or_cuda_torch_builds_cpu_kernels(setup_py, tmp_path, monkeypatch):
    for name in ("GFL_OPS_CPU_ONLY", "FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    assert setup_py["_cuda_config"](_torch("13.0"), None) == (
        False,
        "nvcc not found (set CUDA_HOME to compile the CUDA kernels)",
    )
    assert not setup_py["_cuda_config"](_torch(None), _toolkit(tmp_path, "13.0"))[0]


# ---------------------------------------------------------------------------------------------
# another host architecture


@pytest.mark.slow
def test_cpp_sources_compile_for_aarch64(tmp_path):
    """Every C++ source compiles for aarch64 Linux (GH200, Graviton) against this torch's headers:
    x86-only code outside its guards would break `pip install` on an ARM host
    (scripts/check_aarch64_compile.sh: zig's clang, compile only)."""
    env = dict(os.environ, PY=sys.executable, WORK=str(tmp_path))
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_aarch64_compile.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == len(list(ROOT.glob("csrc/*.cpp")) + list(ROOT.glob("csrc/cpu/*.cpp")))


def test_setup_default_arch_list_adds_the_build_machines_gpu(setup_py, tmp_path):
    """A GPU the default targets miss is added when nvcc compiles for it (a T4, 7.5); one that
    nvcc 13 no longer targets (a V100, 7.0) is only reported; covered ones add nothing."""
    home = Path(_toolkit(tmp_path, "13.0"))
    (home / "bin" / "nvcc").write_text(
        "#!/bin/sh\necho 'compute_75'; echo 'compute_80'; echo 'compute_89'; echo 'compute_90'\n"
    )
    gpus = [(7, 5), (7, 0), (8, 9), (9, 0), (7, 5)]
    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: len(gpus),
            get_device_capability=lambda i: gpus[i],
            get_device_name=lambda i: f"gpu{i}",
        )
    )
    assert setup_py["_default_arch_list"](fake, str(home)) == "8.0;9.0+PTX;7.5"
    fake.cuda.is_available = lambda: False
    assert setup_py["_default_arch_list"](fake, str(home)) == "8.0;9.0+PTX"
