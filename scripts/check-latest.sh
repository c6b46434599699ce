#!/usr/bin/env bash
# The canary: does sdlora still pass its checks with the newest releases of its dependencies?
#   bash scripts/check-latest.sh [pytest args...]
# Sets up a separate venv (.venv-latest; SDLORA_LATEST_VENV to change) with `scripts/setup.sh --latest`, runs ruff,
# mypy and the default tests there, then prints which installed packages differ from requirements/lock.txt and which
# checks failed. Exit code 0 when all checks passed, 1 otherwise. Not part of .ci/run on purpose: a dependency's
# release day must not turn CI red; run this before refreshing the lock (docs/development.md says when and how).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${SDLORA_LATEST_VENV:-.venv-latest}"
LOG_DIR="$VENV/check-logs"

if ! SDLORA_VENV="$VENV" bash scripts/setup.sh --latest; then
    echo "[check-latest] FAILED: scripts/setup.sh --latest could not install the newest versions (see above)"
    exit 1
fi
mkdir -p "$LOG_DIR"

failed=()
run_check() {  # name, command...: runs it with its output in $LOG_DIR/<name>.log, records a failure
    local name=$1; shift
    echo "[check-latest] $name ..."
    if "$@" > "$LOG_DIR/$name.log" 2>&1; then
        echo "[check-latest] $name: passed"
    else
        echo "[check-latest] $name: FAILED (last lines; whole log: $LOG_DIR/$name.log)"
        tail -n 15 "$LOG_DIR/$name.log" | sed 's/^/    /'
        failed+=("$name")
    fi
}
run_check ruff "$VENV/bin/ruff" check src tests benchmarks scripts
run_check ruff-format "$VENV/bin/ruff" format --check src tests benchmarks scripts
run_check mypy "$VENV/bin/mypy"
run_check pytest "$VENV/bin/python" -m pytest -q "$@"

echo "[check-latest] packages that differ from requirements/lock.txt (locked -> installed):"
"$VENV/bin/python" - requirements/lock.txt <<'PY'
import re, sys
from importlib import metadata

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

locked = {}
for line in open(sys.argv[1]):
    m = re.match(r"^([A-Za-z0-9_.-]+)==([^ \\]+)", line)
    if m:
        locked[norm(m.group(1))] = m.group(2)
installed = {norm(d.metadata["Name"]): d.version for d in metadata.distributions() if norm(d.metadata["Name"]) != "sdlora"}
rows = []
for name in sorted(set(locked) | set(installed)):
    a, b = locked.get(name, "-"), installed.get(name, "-")
    if a != b and name not in {"pip"}:
        rows.append(f"    {name:32s} {a:>14s} -> {b}")
print("\n".join(rows) if rows else "    none")
PY

if [ "${#failed[@]}" -eq 0 ]; then
    echo "[check-latest] all checks passed with the newest versions: the lock can be refreshed (scripts/lock.py)"
    exit 0
fi
echo "[check-latest] FAILED with the newest versions: ${failed[*]}"
exit 1
