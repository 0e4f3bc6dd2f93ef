#!/usr/bin/env bash
# From a fresh clone: set up the environment, then run the main job (build the bundled model, print its
# capacity and quality tables).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XQUANT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/xquant-vllm" report
