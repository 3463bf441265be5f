#!/usr/bin/env bash
# Create or reuse .venv and install semisam with its pinned dependencies (idempotent).
# A second run with an unchanged pyproject.toml installs nothing and prints nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.semisam-setup-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python --version 2>&1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import semisam" 2>/dev/null; then
    echo "setup: installing semisam and its pinned dependencies into .venv (a few minutes the first time)" >&2
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    log=.venv/setup.log
    if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[test]"; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: pip install failed (full log above and in $log)" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
    echo "setup: done" >&2
fi
