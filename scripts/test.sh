#!/usr/bin/env bash
# The whole test suite: lint, unit, integration (fake server on loopback) and end-to-end (real
# Airflow processes). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k trigger`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "test: ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "test: pytest"
status=0
# The slowest tests are listed at the end, so a CI log shows where the time goes.
.venv/bin/python -m pytest --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
