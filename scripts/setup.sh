#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the package with its test tools, pinned by constraints.txt.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $python"
    "$python" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip uv
fi
echo "setup: installing airflow-llm-async and its test tools into .venv"
.venv/bin/uv pip install --quiet --python .venv/bin/python -c constraints.txt -e '.[test]'
