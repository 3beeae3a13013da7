#!/usr/bin/env bash
# Build gfl-ops against another torch and run its core tests there, without a GPU.
#
# Why: the lent GPU machine runs torch 2.11 + Triton 3.6 (Python 3.12, no network), while this
# project pins torch 2.14.1.  `make gpu-check` builds the extension there against 2.11; a
# C++ API that 2.11 lacks, or a Triton 3.6 difference, must show up here first, not in the
# few minutes of GPU time.  This script does what gpu-check's build does (one arch, the other
# torch), in a scratch venv and a copy of HEAD, and runs the suite's core tests on the CPU:
# the operators, autograd, torch.compile, the Triton kernels under the interpreter and their
# ahead-of-time compiles for sm_80 / sm_90 with that Triton.
#
# Usage (from the repository root; downloads ~0.5 GB the first time):
#   scripts/check_torch_compat.sh                   # the GPU machine's stack (below)
#   COMPAT_SPEC="torch==2.12.0 torchvision==0.27.0" scripts/check_torch_compat.sh
#
# A torch built for another CUDA than the project's 13.0 (e.g. 2.6 with CUDA 12.4, from PyPI):
#   COMPAT_DEPS=1 GFL_OPS_CPU_ONLY=1 WORK=/tmp/gfl-compat26 \
#       COMPAT_SPEC="torch==2.6.0 torchvision==0.21.0 numpy<2.4" scripts/check_torch_compat.sh
# COMPAT_DEPS=1 installs the spec with its dependencies (its own nvidia-* libraries, a few GB)
# instead of over the project's CUDA 13 libraries; GFL_OPS_CPU_ONLY=1 builds the C++ kernels
# only (nvcc 13.0 does not build for a CUDA 12 torch), so the CUDA kernels go untested there.
#
# The oldest torch gfl-ops supports, 2.1 (what most mmdetection 3.x installs run: mmcv 2.1's
# prebuilt wheels stop at torch 2.1), with the framework adapters' tests too (`make
# test-oldest-torch`, part of `make test`):
#   COMPAT_DEPS=1 GFL_OPS_CPU_ONLY=1 COMPAT_INTEGRATIONS=1 WORK=/tmp/gfl-compat21 \
#       COMPAT_SPEC="torch==2.1.2 torchvision==0.16.2 numpy<2" scripts/check_torch_compat.sh
# COMPAT_INTEGRATIONS=1 installs requirements-dev.txt's pinned mmdet / mmengine / mmcv-lite /
# Ultralytics / ONNX packages beside that torch, installs gfl-ops editable (the adapters' CLI and
# DDP tests start processes that import it) and runs tests/integrations as well.
#
# Notes:
# * torch's CUDA wheel is installed without its nvidia-* dependencies (several GB); the CUDA
#   libraries of the project's .venv are put on LD_LIBRARY_PATH instead (same CUDA 13).
# * numpy < 2.4 for Triton 3.6: its interpreter turns 1-element arrays into ints with int(),
#   which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars").
#   That only matters with TRITON_INTERPRET=1 (CPU tests); compiled kernels on a GPU do not
#   use the interpreter.
# * Left out: tests/detector and tests/test_benchmarks.py (the detector and the benchmarks need
#   torch >= 2.4 and pycocotools), tests/integrations unless COMPAT_INTEGRATIONS=1, and
#   tests/test_cuda_compiled.py (asserts the default multi-arch build; this one is sm_90 only).
set -euo pipefail
cd "$(dirname "$0")/.."

COMPAT_SPEC=${COMPAT_SPEC:-"torch==2.11.0 torchvision==0.26.0 triton==3.6.0 numpy<2.4"}
WORK=${WORK:-/tmp/gfl-compat}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
MAIN_VENV=${MAIN_VENV:-.venv}

mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
    "$PYTHON" -m venv "$WORK/venv"
fi
VPY="$WORK/venv/bin/python"
# shellcheck disable=SC2086  # the spec is a list of requirements
if [ "${COMPAT_DEPS:-0}" = 1 ]; then
    "$VPY" -m pip install --quiet $COMPAT_SPEC
else
    "$VPY" -m pip install --quiet --no-deps $COMPAT_SPEC
fi
"$VPY" -m pip install --quiet filelock typing-extensions sympy networkx jinja2 fsspec \
    pillow scipy pytest hypothesis ninja setuptools wheel
integrations=(--ignore=tests/integrations)
if [ "${COMPAT_INTEGRATIONS:-0}" = 1 ]; then
    # the main suite's pins, with the spec again so that nothing moves the torch (or numpy) under
    # test
    pins='^(mmdet|mmengine|mmcv-lite|ultralytics|cloudpickle|onnx|onnxruntime|onnxscript)\b'
    frameworks=$(grep -E "$pins" requirements-dev.txt)
    # shellcheck disable=SC2086
    "$VPY" -m pip install --quiet $COMPAT_SPEC $frameworks
    integrations=()
fi

if [ "${COMPAT_DEPS:-0}" != 1 ]; then
    nvidia_libs=$(find "$MAIN_VENV"/lib/python3*/site-packages/nvidia -maxdepth 3 -type d \
        -name lib 2>/dev/null | sed "s|^|$PWD/|" | paste -sd:)
    export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
"$VPY" -c "import torch; print('compat torch', torch.__version__, 'CUDA', torch.version.cuda)"

SRC="$WORK/src"
rm -rf "$SRC" && mkdir -p "$SRC"
git archive HEAD | tar -x -C "$SRC"
cd "$SRC"
if [ "${COMPAT_INTEGRATIONS:-0}" = 1 ]; then
    MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        "$VPY" -m pip install --quiet --no-build-isolation --no-deps -e .
else
    MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        "$VPY" setup.py build_ext --inplace
fi
"$VPY" -c "import gfl_ops; print('gfl_ops backends:', gfl_ops.backend_status())"
# tests/test_triton_compiled.py's ahead-of-time compiles use Triton internals of 3.6
# (native_specialize_impl): with an older torch's Triton they cannot start
older=()
if [ "${COMPAT_DEPS:-0}" = 1 ]; then
    older=(--ignore=tests/test_triton_compiled.py)
fi
"$VPY" -m pytest -q -p no:cacheprovider tests "${integrations[@]}" --ignore=tests/detector \
    --ignore=tests/test_benchmarks.py --ignore=tests/test_cuda_compiled.py "${older[@]}" "$@"
