#!/usr/bin/env bash
# The article's pipeline end to end on real Airflow processes and the embedded fake LLM server.
# No API key needed; everything it starts is stopped when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
