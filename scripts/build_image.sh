#!/usr/bin/env bash
# Build the Dockerfile without a Docker engine or registry (shared/spec/container-build.md): buildah with chroot
# isolation on a Debian bookworm base made by debootstrap; then start the image's command, send real requests
# to it, stop it with SIGTERM, and record every command with its output in benchmarks/results/image_build.log.
#
#   sudo scripts/build_image.sh            # VARIANT=gpu builds vLLM's CUDA variant (built, not served here)
#
# Environment: VARIANT (cpu|gpu, default cpu), IMAGE (default localhost/xquant-vllm:$VARIANT), PORT (default 8000),
# LOG (default benchmarks/results/image_build.log), WHEELS (a folder of wheels pip may use, default /opt/wheels:
# torch 2.13.0+cpu is not on PyPI and PyTorch's index may be unreachable).
set -euo pipefail

cd "$(dirname "$0")/.."
VARIANT=${VARIANT:-cpu}
IMAGE=${IMAGE:-localhost/xquant-vllm:$VARIANT}
BASE=localhost/debian-base:bookworm
PORT=${PORT:-8000}
LOG=${LOG:-benchmarks/results/image_build.log}
WHEELS=${WHEELS:-/opt/wheels}
WORK=$(mktemp -d)
SERVER_PID=""

mkdir -p "$(dirname "$LOG")"
: > "$LOG"
note() { printf '\n## %s\n' "$*" | tee -a "$LOG"; }
# step CMD...: log the command, run it with output to the log (and the terminal), log its time and status.
step() {
  printf '\n$ %s\n' "$*" | tee -a "$LOG"
  local start=$SECONDS status=0
  "$@" > >(tee -a "$LOG") 2>&1 || status=$?
  printf '[%ds, exit %d]\n' $((SECONDS - start)) "$status" | tee -a "$LOG"
  return "$status"
}
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -TERM "$SERVER_PID" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

note "xquant-vllm image build, $(date -u +%FT%TZ), $(uname -m), VARIANT=$VARIANT, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

note "tools"
command -v buildah >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null \
  || step env DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update -q && apt-get install -y -q buildah runc debootstrap'
step buildah --version

note "base image $BASE from Debian packages (debootstrap)"
if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "$BASE exists; reused" | tee -a "$LOG"
else
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(grep -hm1 -oE '^deb +(\[[^]]*\] +)?https?://[^ ]+' /etc/apt/sources.list | awk '{print $NF}')
  step debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR"
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  CTR=$(buildah from scratch)
  MNT=$(buildah mount "$CTR")
  step sh -c "tar -C '$WORK/rootfs' -cf - . | tar -C '$MNT' -xf -"
  buildah umount "$CTR" >/dev/null
  step buildah commit --rm "$CTR" "$BASE"
fi

note "build $IMAGE (buildah bud, chroot isolation; docker format keeps HEALTHCHECK)"
# pip inside the build reaches PyPI through the host's CA bundle; the wheel folder gives it torch 2.13.0+cpu.
printf '[global]\ncert = /run/host-ca.crt\n' > "$WORK/pip-build.conf"
MOUNTS=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -v "$WORK/pip-build.conf":/etc/pip.conf:ro)
BUILD_ARGS=(--build-arg BASE_IMAGE="$BASE" --build-arg VARIANT="$VARIANT")
if [ -d "$WHEELS" ]; then
  printf 'find-links = /run/host-wheels\n' >> "$WORK/pip-build.conf"
  MOUNTS+=(-v "$WHEELS":/run/host-wheels:ro)
  BUILD_ARGS+=(--build-arg TORCH_INDEX_URL=)
fi
cat "$WORK/pip-build.conf" | tee -a "$LOG"
step buildah bud --isolation chroot --layers --format docker "${MOUNTS[@]}" "${BUILD_ARGS[@]}" -t "$IMAGE" .
step buildah images "$IMAGE"
step buildah inspect --type image --format \
  'User={{.Docker.Config.User}} Cmd={{.Docker.Config.Cmd}} Healthcheck={{.Docker.Config.Healthcheck}}' "$IMAGE"

if [ "$VARIANT" != cpu ]; then
  note "VARIANT=$VARIANT: built only (this machine has no GPU)"
  exit 0
fi

note "run the image's command (buildah run shares the host network) and send requests"
mapfile -t RUNCMD < <(buildah inspect --type image --format \
  '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}{{range .OCIv1.Config.Cmd}}{{println .}}{{end}}' "$IMAGE")
if [ "$PORT" != 8000 ]; then RUNCMD=("${RUNCMD[@]//--port 8000/--port $PORT}"); fi
CTR=$(buildah from "$IMAGE")
printf '\n$ buildah run --isolation chroot %s -- %s &\n' "$CTR" "${RUNCMD[*]}" | tee -a "$LOG"
buildah run --isolation chroot "$CTR" -- "${RUNCMD[@]}" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
start=$SECONDS
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null || [ $((SECONDS - start)) -gt 600 ]; then
    tail -50 "$WORK/server.log" | tee -a "$LOG"
    echo "server did not become healthy" | tee -a "$LOG"
    exit 1
  fi
  sleep 2
done
echo "healthy after $((SECONDS - start)) s" | tee -a "$LOG"
grep -E "KV cache size|xquant-vllm: preset|xquant-vllm: KV cache" "$WORK/server.log" | tee -a "$LOG" || true
step curl -s "http://127.0.0.1:$PORT/health"
step curl -s "http://127.0.0.1:$PORT/v1/models"
MODEL=$(curl -s "http://127.0.0.1:$PORT/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
step curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16, \"temperature\": 0}"
step curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Name a primary colour.\"}], \"max_tokens\": 16, \"temperature\": 0}"
step sh -c "curl -s http://127.0.0.1:$PORT/metrics | grep -E '^(xquant_kv_|vllm:num_requests_running|vllm:kv_cache_usage_perc)'"

note "stop with SIGTERM"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""
tail -5 "$WORK/server.log" | tee -a "$LOG"
buildah rm "$CTR" >/dev/null
note "done in ${SECONDS}s"
