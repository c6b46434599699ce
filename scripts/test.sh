#!/usr/bin/env bash
# The test suite, from a fresh clone: set up (idempotent), lint, type-check, then the default tests (slow ones: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
.venv/bin/mypy  # settings and checked files: [tool.mypy] in pyproject.toml
.venv/bin/python -m pytest -q "$@"
