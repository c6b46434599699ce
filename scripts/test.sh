#!/usr/bin/env bash
# The test suite, from a fresh clone: set up (idempotent), lint, then the default tests (slow ones: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
