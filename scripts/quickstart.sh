#!/usr/bin/env bash
# From a fresh clone: set up the environment, build the bundled SmolLM2, print its capacity and quality
# tables, then serve it with vLLM's OpenAI server and the xquant KV cache on http://127.0.0.1:8000 (Ctrl-C stops
# it). Arguments go to `xquant-vllm serve` (e.g. --kv-cache-dtype auto, --port 9000, --host 0.0.0.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XQUANT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$VENV/bin/xquant-vllm" report

PORT=8000
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = --port ]; then j=$((i + 1)); PORT=${!j}; fi
  case "${!i}" in --port=*) PORT=${!i#--port=} ;; esac
done
"$VENV/bin/xquant-vllm" serve "$@" &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER"' INT TERM
echo "[quickstart] starting the server (1-2 minutes on a CPU) ..."
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
  kill -0 "$SERVER" 2>/dev/null || { wait "$SERVER"; exit $?; }  # it stopped: its own message says why
  sleep 2
done
echo "[quickstart] serving on http://127.0.0.1:$PORT; try: curl http://127.0.0.1:$PORT/v1/completions \\"
echo "[quickstart]   -H 'Content-Type: application/json' \\"
echo "[quickstart]   -d '{\"model\": \"smollm2-135m-instruct\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}'"
wait "$SERVER"
