#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the package with its test tools, pinned by constraints.txt.
# Idempotent: a second run only checks that everything is there.
#   --browser   also install Chromium (apt-get, as root): only the dashboard's end-to-end test needs it
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
browser=0
for arg in "$@"; do
    case "$arg" in
        --browser) browser=1 ;;
        *) echo "setup: unknown argument $arg (known: --browser)" >&2; exit 2 ;;
    esac
done

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

# The dashboard test drives a real headless Chromium: Debian's package, installed once (as root).
install_chromium() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }
if [ "$browser" -eq 1 ] && [ ! -x /usr/bin/chromium ]; then
    if ! command -v apt-get >/dev/null || [ "$(id -u)" -ne 0 ]; then
        echo "setup: Chromium (/usr/bin/chromium) is missing; as root: apt-get install chromium" >&2
        exit 1
    fi
    log=${TMPDIR:-/tmp}/airflow-llm-setup-chromium.log
    echo "setup: installing Chromium with apt-get (log: $log)"
    # A fresh machine may have no package lists yet: update them only when the first try fails.
    if ! install_chromium >"$log" 2>&1 && ! { apt-get update -qq && install_chromium; } >>"$log" 2>&1; then
        echo "setup: apt-get could not install chromium; see $log" >&2
        exit 1
    fi
fi
echo "setup: done in $(($(date +%s) - started)) s"
