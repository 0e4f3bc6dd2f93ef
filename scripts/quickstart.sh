#!/usr/bin/env bash
# From a fresh clone: set up the environment, build the bundled SmolLM2, print its capacity and quality
# tables, then serve it with the xquant KV cache on http://127.0.0.1:8000 (OpenAI API; Ctrl-C stops it).
# Arguments go to `xquant-vllm serve` (e.g. --kv-cache-dtype auto, --port 9000, --host 0.0.0.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XQUANT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$VENV/bin/xquant-vllm" report
echo "[quickstart] serving; try: curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\"
echo "[quickstart]   -d '{\"model\": \"smollm2-135m-instruct\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}'"
exec "$VENV/bin/xquant-vllm" serve --kv-cache-dtype xquant "$@"
