#!/usr/bin/env bash
# The whole test suite: lint, unit, integration (fake server on loopback) and end-to-end (real
# Airflow processes). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k trigger`.
#   --fast   only what needs no Airflow process: ruff, unit and integration tests (-m "not e2e")
# Prints the wall time (set-up and tests) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
setup_s=""
report_time() { echo "test: wall time $(($(date +%s) - started)) s (set-up ${setup_s:-unfinished} s and tests)"; }
trap report_time EXIT

fast=0
args=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then fast=1; else args+=("$arg"); fi
done

if [ "$fast" -eq 1 ]; then bash scripts/setup.sh; else bash scripts/setup.sh --browser; fi
setup_s=$(($(date +%s) - started))

# With PYTHONDONTWRITEBYTECODE set, every Python process (pytest, the doc blocks' `airflow` commands,
# the Airflow components) would compile all it imports again: ~2 s of CPU each. Keep the bytecode
# outside the source trees instead, where AirflowStack keeps its components' too.
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] && [ -z "${PYTHONPYCACHEPREFIX:-}" ]; then
    unset PYTHONDONTWRITEBYTECODE
    export PYTHONPYCACHEPREFIX="${XDG_CACHE_HOME:-$HOME/.cache}/airflow-llm-async/pycache"
fi

echo "test: ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "test: pytest"
pytest_args=(--durations=15)
if [ "$fast" -eq 1 ]; then
    pytest_args+=(-m "not e2e")
else
    # Two workers: the shared e2e deployment, the fault tests' deployment and the doc tests run side
    # by side (tests/e2e/conftest.py); the tests of one deployment stay on one worker (loadgroup).
    pytest_args+=(-n 2 --dist loadgroup)
fi
status=0
# The slowest tests are listed at the end, so a CI log shows where the time goes.
.venv/bin/python -m pytest "${pytest_args[@]}" ${args[@]+"${args[@]}"} || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
