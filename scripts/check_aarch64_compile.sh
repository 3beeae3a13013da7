#!/usr/bin/env bash
# Cross-compile gfl_ops._C's C++ sources for 64-bit ARM Linux (aarch64: GH200 Grace Hopper,
# Graviton, Ampere Altra), without an ARM machine.
#
# Why: the CPU kernels are built three times on x86-64 (portable, AVX2, AVX-512: csrc/cpu/) and
# at::vec takes NEON / SVE paths on ARM; an x86-only intrinsic or builtin outside the
# `__x86_64__` guards would break `pip install` on an ARM host, which no x86 CI build notices.
# zig's clang (the pip package `ziglang`) carries aarch64 glibc and C++ headers, so every C++
# source compiles here against this checkout's torch headers (torch's headers are the same on
# both architectures).  Compiles only: nothing is linked or run, and the CUDA sources are left
# out (their device code does not depend on the host; nvcc here targets x86-64 hosts only).
#
# Usage (from the repository root, after `make setup`; downloads ~100 MB once, ~1 min a file on
# 2 cores):  scripts/check_aarch64_compile.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/gfl-aarch64}
mkdir -p "$WORK"
ZIG="$WORK/ziglang/zig"
if [ ! -x "$ZIG" ]; then
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK/dl" ziglang
    "$PY" -m zipfile -e "$WORK"/dl/ziglang-*.whl "$WORK"
    chmod +x "$ZIG"
fi
TORCH_INCLUDE=$("$PY" -c "import torch.utils.cpp_extension as e; print(e.include_paths()[0])")
PY_INCLUDE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
export ZIG_GLOBAL_CACHE_DIR="$WORK/cache" ZIG_LOCAL_CACHE_DIR="$WORK/cache"

failed=0
for source in csrc/*.cpp csrc/cpu/*.cpp; do
    if "$ZIG" c++ -target aarch64-linux-gnu -c -o "$WORK/$(basename "$source").o" -std=c++20 \
        -O1 -fPIC -Wno-macro-redefined -Wno-pass-failed -I"$TORCH_INCLUDE" \
        -I"$TORCH_INCLUDE/torch/csrc/api/include" -I"$PY_INCLUDE" -Icsrc \
        -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1 \
        "$source" > "$WORK/$(basename "$source").log" 2>&1; then
        echo "ok      $source"
    else
        echo "FAILED  $source (log: $WORK/$(basename "$source").log)"
        grep -m 5 "error" "$WORK/$(basename "$source").log" || true
        failed=1
    fi
done
"$PY" -c "import torch; print('aarch64-linux-gnu, torch', torch.__version__, 'headers')"
exit $failed
