# gfl-ops: one-command setup, demo and tests on a fresh machine (Python 3.11, no GPU needed).
#
#   make demo    virtual env + torch + build, then the main job (train/eval the detector on the
#                embedded dataset, CPU)
#   make test    virtual env + torch + build, then the whole test suite, then the adapters'
#                tests against older mmdetection / Ultralytics releases (test-versions), then
#                the core and adapter tests on the oldest torch supported (test-oldest-torch)
#   make test-oldest-torch  only that: a scratch venv with torch 2.1 (mmdetection 3.x's usual),
#                gfl-ops built there (CPU kernels) and its tests except the detector's
#                (scripts/check_torch_compat.sh; ~3 GB of downloads, ~10 min)
#   make test-versions  only that: scripts/check_framework_versions.py (REPORT=1 rewrites
#                docs/framework-versions.md)
#   make bench   the core benchmark targets on the CPU (benchmarks/README.md); bench-full,
#                bench-e2e for the whole grid and the detector's loss step, bench-frameworks for
#                a training step of mmdetection's GFLHead and YOLOv8n, stock vs fused
#   make gpu-check  on a machine with one GPU: build for it, run the CUDA/Triton tests, the GPU
#                benchmarks and a detector step, write benchmarks/results/gpu-<device>.{csv,md}
#                (QUICK=1: under 3 minutes; DRY_RUN=1: rehearse the wiring on a CPU machine;
#                STEPS=frameworks,sweep: only those, e.g. in a second call).
#                Uses the GPU machine's own python3 with its torch (GPU_PYTHON to change it).
#   make gpu-wheels  fetch into .whl/ the mmdet / Ultralytics wheels (CPython 3.12) that the lent
#                GPU machine lacks, for gpu-check's frameworks step (scripts/gpu_wheels.sh)
#   make paper-bounds  (no GPU; nvcc) count every CUDA launch mode's bound in the SASS into
#                benchmarks/results/paper-bounds-sm90.csv, which gpu-check's kernel sweep compares
#                with; needed after any change to csrc/cuda or csrc/gfl_math.h (a test says so)
#   make lint    virtual env, then `ruff check .` (pyproject.toml's rules; no build needed)
#
# Variables: PYTHON (interpreter for the venv), VENV (its folder), MAX_JOBS (parallel compile),
# TORCH_CUDA_ARCH_LIST (GPU archs compiled when nvcc is present; default 8.0;9.0+PTX: SASS for
# sm_80 and sm_90 plus PTX for sm_90, which newer GPUs JIT; e.g. "8.9;9.0;10.0+PTX" for others).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
MAX_JOBS ?= 2
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# the oldest torch gfl_ops supports (build_backend/torch_matched_build.py's TORCH_REQUIREMENT):
# 2.1 takes numpy 1.x; its CUDA 12 build gets no kernels from this machine's nvcc 13 (CPU only)
OLDEST_TORCH_SPEC ?= torch==2.1.2 torchvision==0.16.2 numpy<2

.PHONY: setup build demo test test-versions test-oldest-torch bench bench-full bench-e2e bench-frameworks gpu-check gpu-wheels \
	paper-bounds lint clean

# gpu-check runs where the project's venv is usually absent (the lent GPU machine's python3)
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)

$(VENV)/.deps-stamp: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Rebuilt whenever a C++/CUDA source or setup.py changes.
$(VENV)/.build-stamp: $(VENV)/.deps-stamp setup.py $(shell find csrc -type f 2>/dev/null)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --no-build-isolation --no-deps -e . \
		|| { echo "gfl-ops build failed: see the compiler output above"; exit 1; }
	$(PY) -c "import gfl_ops; print('gfl_ops backends:', gfl_ops.backend_status())"
	touch $@

setup: $(VENV)/.build-stamp

build: setup

demo: setup
	$(PY) -m detector.main_job

# lint first: a tree that ruff rejects fails CI before the half-hour of tests
test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(PY) scripts/check_framework_versions.py
	$(MAKE) test-oldest-torch

test-versions: setup
	$(PY) scripts/check_framework_versions.py $(if $(REPORT),--report docs/framework-versions.md)

test-oldest-torch:
	COMPAT_DEPS=1 GFL_OPS_CPU_ONLY=1 COMPAT_INTEGRATIONS=1 WORK=/tmp/gfl-compat-oldest \
		COMPAT_SPEC="$(OLDEST_TORCH_SPEC)" PYTHON="$(PYTHON)" scripts/check_torch_compat.sh

bench: setup
	$(PY) -m benchmarks.run --device cpu --preset core-targets

bench-full: setup
	$(PY) -m benchmarks.run

bench-e2e: setup
	$(PY) -m benchmarks.e2e_loss_step

bench-frameworks: setup
	$(PY) -m benchmarks.e2e_frameworks

gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(if $(QUICK),--quick) $(if $(DRY_RUN),--dry-run) \
		$(if $(STEPS),--steps $(STEPS))

gpu-wheels:
	scripts/gpu_wheels.sh

paper-bounds: build
	$(PY) -m benchmarks.paper_bounds

# ruff needs the dev requirements only, not the compiled extension
lint: $(VENV)/.deps-stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info gfl_ops/_C*.so $(VENV)/.build-stamp
