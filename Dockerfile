# syntax=docker/dockerfile:1.7
# optjob-worker for NVIDIA GPU hosts: runs exactly one optimization job and exits (see docs/workers.md).
#
#   docker build -t optjob-worker:0.1.0 --build-arg OPTJOB_VERSION=0.1.0 .
#   docker run --rm --gpus all -e OPTJOB_SPEC_URI=s3://bucket/specs/job.json optjob-worker:0.1.0
#
# Two stages: "build" has pip and the source tree and fills a virtual environment; the runtime stage
# copies only that environment and the rule files onto the same CUDA base, so no compiler, pip cache
# or source checkout ships. Every Python package is pinned by requirements.lock (torch by its CUDA
# wheel index below); pin the base image by digest at release time for byte-for-byte rebuilds:
#   docker buildx imagetools inspect nvidia/cuda:12.8.1-runtime-ubuntu24.04
# No HEALTHCHECK on purpose: the container is one-shot; its exit status is the health signal.

ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/optjob
ENV PATH=/opt/optjob/bin:$PATH
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
# The CUDA build of torch first, from its own index; the lock's torch==X matches X+cuNNN.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY optjob ./optjob
COPY workers ./workers
RUN pip install --constraint requirements.lock . \
 && find /opt/optjob -name '__pycache__' -prune -exec rm -rf {} + \
 && optjob-worker --version

FROM ${CUDA_BASE} AS runtime
ARG OPTJOB_VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="optjob-worker" \
      org.opencontainers.image.description="Runs one SageMaker-compatible model optimization job on an NVIDIA GPU host, then exits" \
      org.opencontainers.image.version="${OPTJOB_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.optjob.worker.variant="cuda"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 optjob \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/optjob --shell /usr/sbin/nologin optjob \
 && mkdir -p /work && chown 10001:10001 /work
COPY --from=build /opt/optjob /opt/optjob
COPY configs /opt/optjob/configs
ENV PATH=/opt/optjob/bin:$PATH \
    OPTJOB_CONFIG_DIR=/opt/optjob/configs \
    OPTJOB_WORK_DIR=/work \
    OPTJOB_HOME=/home/optjob/.optjob \
    HOME=/home/optjob \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /work
# Numeric so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Exec form: the worker is PID 1 and receives the scheduler's SIGTERM itself.
ENTRYPOINT ["optjob-worker"]
