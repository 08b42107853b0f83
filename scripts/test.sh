#!/usr/bin/env bash
# The whole test suite: lint, unit, integration (fake server on loopback), end-to-end (real Airflow
# processes), then the conformance tier (LiteLLM's proxy, a real OpenAI-compatible server: its own
# virtualenv .venv-litellm, ~10 s to make, ~1 min to run). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -k trigger` (the conformance tier then runs only if they name tests/conformance).
#   --fast          only what needs no Airflow process: ruff, unit and integration tests, without the
#                   few that take 10 s or more (-m "not e2e and not slow"; the full run has them), on two workers
#   --conformance   only the conformance tier (tests/conformance), after making .venv-litellm
# Prints the wall time (set-up and tests) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
setup_s=""
report_time() { echo "test: wall time $(($(date +%s) - started)) s (set-up ${setup_s:-unfinished} s and tests)"; }
trap report_time EXIT

mode=full
args=()
for arg in "$@"; do
    case "$arg" in
        --fast) mode=fast ;;
        --conformance) mode=conformance ;;
        *) args+=("$arg") ;;
    esac
done

case "$mode" in
    fast) bash scripts/setup.sh ;;
    conformance) bash scripts/setup.sh && bash scripts/setup_litellm.sh ;;
    full) bash scripts/setup.sh --browser && bash scripts/setup_litellm.sh ;;
esac
setup_s=$(($(date +%s) - started))

# With PYTHONDONTWRITEBYTECODE set, every Python process (pytest, the doc blocks' `airflow` commands,
# the Airflow components) would compile all it imports again: ~2 s of CPU each. Keep the bytecode
# outside the source trees instead, where AirflowStack keeps its components' too.
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] && [ -z "${PYTHONPYCACHEPREFIX:-}" ]; then
    unset PYTHONDONTWRITEBYTECODE
    export PYTHONPYCACHEPREFIX="${XDG_CACHE_HOME:-$HOME/.cache}/airflow-llm-async/pycache"
fi

if [ "$mode" != conformance ]; then
    echo "test: ruff"
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
fi

# The slowest tests are listed at the end, so a CI log shows where the time goes.
run_pytest() {
    local status=0
    .venv/bin/python -m pytest --durations=15 "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "test: pytest collected no tests; that is a failure" >&2
        return 1
    fi
    return "$status"
}

# The conformance tier runs on its own, one LiteLLM proxy for all its tests (tests/conformance/conftest.py).
conformance=(-m conformance tests/conformance)
status=0
case "$mode" in
    conformance)
        echo "test: pytest, conformance tier"
        run_pytest "${conformance[@]}" ${args[@]+"${args[@]}"} || status=$?
        ;;
    fast)
        echo "test: pytest"
        # Two workers, as the full run: the tiers below are already safe to run side by side there.
        run_pytest -n 2 --dist loadgroup -m "not e2e and not slow" ${args[@]+"${args[@]}"} || status=$?
        ;;
    full)
        echo "test: pytest"
        # Two workers: the shared e2e deployment, the fault tests' deployment and the doc tests run side
        # by side (tests/e2e/conftest.py); the tests of one deployment stay on one worker (loadgroup).
        run_pytest -n 2 --dist loadgroup ${args[@]+"${args[@]}"} || status=$?
        if [ "${#args[@]}" -eq 0 ]; then
            echo "test: pytest, conformance tier"
            run_pytest "${conformance[@]}" || status=$?
        fi
        ;;
esac
exit "$status"
