#!/usr/bin/env bash
# Wheels for `make gpu-check`'s frameworks step on the lent GPU machine.
#
# Why: that machine (Python 3.12, torch 2.11, no network) has neither mmdetection nor
# Ultralytics, so benchmarks/e2e_frameworks.py -- one training step of mmdet's GFLHead and of
# YOLOv8n, stock vs fused (issue #16) -- cannot run there unless they travel with the call.
# This fetches them, for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored), with what they
# import that the machine's image lacks (its package list: the tool library's
# device/KINDS.md; matplotlib, scipy, opencv, rich, pyyaml, requests, psutil, tqdm, six are
# there).  ~8 MB; the device call carries at most 64 MiB with the repository.
#
# Left out on purpose, though the frameworks' metadata lists them: polars (its 54 MB runtime
# alone nearly fills the limit), ultralytics-thop and ultralytics-platform -- none is imported
# by the benchmark (checked by blocking their imports; the step runs the same), and the
# wheels go in with --no-deps.
#
# Usage, here (needs pip and the package index):
#   make gpu-wheels                      # or: scripts/gpu_wheels.sh
# then the device call, with carry [".whl"] (benchmarks/README.md, "The GPU check"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && \
#       python3 -m benchmarks.gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${DEST:-.whl}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

WHEELS=(
    # the frameworks, at the versions CI tests them at (requirements-dev.txt)
    mmdet==3.3.0 mmengine==0.10.7 mmcv-lite==2.1.0 ultralytics==8.4.190
    # what their import of GFLHead / DetectionModel needs beyond the image
    addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0 terminaltables==3.1.10
    shapely==2.2.0 pycocotools==2.0.11
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    PLATFORMS+=(--platform "$p")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two stop the install there
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
count=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
    echo "gpu_wheels: expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2
    exit 1
fi
echo "$count wheels, $(du -sh "$DEST" | cut -f1) in $DEST/: carry \"$DEST\" in the device call"
