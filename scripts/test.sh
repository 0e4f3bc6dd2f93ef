#!/usr/bin/env bash
# Run the test suite: set up (or check) the project's venv first, then pytest with the given arguments.
# pytest's exit code is kept: 5, no test collected, fails like any other non-zero code.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XQUANT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
