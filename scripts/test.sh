#!/usr/bin/env bash
# Run the test suite with the project's venv; arguments go to pytest, and so does its exit code
# (5, no test collected, fails like any other non-zero code).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XQUANT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[test] no virtual environment at $VENV: run 'bash scripts/setup.sh' first" >&2
    exit 1
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
