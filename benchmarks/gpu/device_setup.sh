#!/usr/bin/env bash
# On the GPU machine, from the repo root: collect the parts carried in this call into a stash outside the repo
# (it survives while the machine stays warm), unpack each stream once complete, install this repo's plugin,
# build the SmolLM2 checkpoint, and export the environment.
#
#   source benchmarks/gpu/device_setup.sh .gpu-stage/gpu/cK     # K-th call of benchmarks/gpu/stage.py's plan
#   source benchmarks/gpu/device_setup.sh none                  # later calls on the same warm machine
#
# Status: 0 = ready (vLLM and, once the assets are complete, SmolLM2); 3 = vLLM parts still missing (it says
# which); 1 = error. Parts are checked against their MANIFEST (sha256). Do not `set -e` before sourcing it.
_xq_collect() {  # kind carried stash -> 0 complete, 3 missing, 1 error
  local kind="$1" carried="$2" stash="$3" f have=0 need=0 missing="" k name sum size
  local parts="$stash/parts-$kind"
  mkdir -p "$parts"
  for f in "$carried"/"$kind"/p[0-9][0-9]/*.part.*; do
    [ -e "$f" ] || continue
    if [ -f "$parts/MANIFEST" ] && ! cmp -s "$parts/MANIFEST" "$(dirname "$f")/MANIFEST"; then
      echo "device_setup: new $kind stream: clearing the old one"; rm -rf "$parts" "$stash/$kind.done"; mkdir -p "$parts"
    fi
    cp "$(dirname "$f")/MANIFEST" "$parts/MANIFEST" && cp "$f" "$parts/"
    echo "device_setup: stashed $kind $(basename "$f") ($(stat -c %s "$f") bytes)"
  done
  [ -f "$parts/MANIFEST" ] || { echo "device_setup: no $kind parts yet"; return 3; }
  [ -f "$stash/$kind.done" ] && cmp -s "$stash/$kind.done" "$parts/MANIFEST" && return 0
  while read -r k name sum size; do
    [ "$k" = part ] || continue
    need=$((need + 1))
    if [ -f "$parts/$name" ] && [ "$(sha256sum "$parts/$name" | cut -d' ' -f1)" = "$sum" ]; then
      have=$((have + 1))
    else
      missing="$missing $name"
    fi
  done < "$parts/MANIFEST"
  echo "device_setup: $kind: $have of $need parts${missing:+ (missing:$missing)}"
  [ "$have" -eq "$need" ] || return 3
  if [ "$kind" = vllm ]; then
    rm -rf "$stash/site" && mkdir -p "$stash/site"
    cat "$parts"/bundle.part.* | xz -dc -T0 | tar -x -C "$stash/site" || return 1
  else
    rm -rf "$stash/assets" && mkdir -p "$stash/assets"
    cat "$parts"/assets.part.* | tar -x -C "$stash/assets" || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$stash/site" "$stash"/assets/wheels/*.whl || return 1
  fi
  cp "$parts/MANIFEST" "$stash/$kind.done"
  echo "device_setup: unpacked $kind"
}

_xq_setup() {
  local carried="$1" stash="${2:-/root/stash}" t0=$SECONDS rc
  mkdir -p "$stash"
  _xq_collect vllm "$carried" "$stash"; rc=$?
  [ $rc = 0 ] || return $rc
  export PYTHONPATH="$stash/plugin:$stash/site:$stash/assets" XQUANT_CACHE="$stash/cache"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
  export VLLM_USE_FLASHINFER_SAMPLER=0  # the bundle has no flashinfer (shared/gpu/README.md)
  # the plugin from this call's tree (its entry point needs installed metadata)
  rm -rf "$stash/plugin"
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$stash/plugin" . >/dev/null || return 1
  rm -rf build ./*.egg-info
  _xq_collect assets "$carried" "$stash"; rc=$?
  [ $rc = 1 ] && return 1
  if [ $rc = 0 ]; then
    python3 -m xquant_vllm.bundled >/dev/null || return 1  # SmolLM2 from the GGUF in $stash/assets (once)
    export XQUANT_SMOLLM2="$stash/cache/models/SmolLM2-135M-Instruct" XQUANT_WINDOWS="$stash/assets/windows.json"
  fi
  echo "device_setup: ready in $((SECONDS - t0)) s (SmolLM2: ${XQUANT_SMOLLM2:-not yet})"
}
_xq_setup "$@"
