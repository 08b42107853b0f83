#!/usr/bin/env bash
# Create .venv-litellm: LiteLLM's proxy, the real OpenAI-compatible server of the conformance tier
# (tests/conformance, `bash scripts/test.sh --conformance`), in a virtualenv of its own: its pins
# (tests/conformance/litellm-requirements.txt) must not meet the provider's.
# Idempotent: when the installed pins are the files' current ones, it only says so.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
venv=.venv-litellm
requirements=tests/conformance/litellm-requirements.txt
pins=$(cat "$requirements" tests/conformance/litellm-proxy-requirements.txt)
stamp=$venv/installed-requirements.txt

if [ -x "$venv/bin/litellm" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then
    echo "setup-litellm: $venv is up to date"
    exit 0
fi
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$venv/bin/python" ]; then
    echo "setup-litellm: creating $venv with $python"
    "$python" -m venv "$venv"
fi
echo "setup-litellm: installing LiteLLM's proxy into $venv"
# uv (in .venv after scripts/setup.sh) resolves and installs the ~100 packages several times faster than pip.
if [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install --quiet --python "$venv/bin/python" -r "$requirements"
else
    "$venv/bin/python" -m pip install --quiet -r "$requirements"
fi
printf '%s' "$pins" >"$stamp"
echo "setup-litellm: done in $(($(date +%s) - started)) s"
