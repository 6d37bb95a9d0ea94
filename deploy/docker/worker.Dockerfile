# syntax=docker/dockerfile:1
# GPU worker image: runs `imgjobs worker --model NAME`, one container per GPU.
#
#   docker build -f deploy/docker/worker.Dockerfile -t imgjobs-worker .     # from the repository root
#   docker run --gpus device=0 -e IMGJOBS_BROKER_URL=... -e IMGJOBS_MODELS=/etc/imgjobs/models.yaml \
#     -v ./deploy/models.example.yaml:/etc/imgjobs/models.yaml:ro -v imgjobs-models:/models \
#     imgjobs-worker --model sd15
#
# The base is NVIDIA's CUDA runtime image (driver-facing libraries, the NVIDIA container toolkit's
# conventions), with Python from Ubuntu. torch's Linux wheels still bring their own CUDA and cuDNN;
# BASE_IMAGE=python:3.11-slim-bookworm gives a smaller image that runs the same way where the
# host's driver is recent enough for the wheel's CUDA.
#
# Build arguments, three that go together: the base image's CUDA is the one torch's wheel is built
# for, so that the NVIDIA container toolkit's check of the host driver (NVIDIA_REQUIRE_CUDA, set by the
# base image) refuses a host whose driver cannot run that torch, rather than torch failing later.
#   BASE_IMAGE       default nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 (CUDA 13.0: driver 580 or newer)
#   TORCH_SPEC       default torch==2.13.0, the release the CPU CI tests (Makefile's TORCH_SPEC)
#   TORCH_INDEX_URL  default PyTorch's cu130 index, torch's CUDA 13.0 build; for an older driver or GPU,
#                    another CUDA's index (cu126 ...) together with a base image of that CUDA, if the
#                    pinned release has a build for it

ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base
# Python and venv from the distribution (the CUDA images have none); a no-op on python: images.
RUN if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
# torch first and alone: the largest layer stays cached while the project's code changes.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml README.md /src/
COPY schemas /src/schemas
COPY jobstate /src/jobstate
COPY jobs /src/jobs
COPY workers /src/workers
RUN pip install /src

FROM base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    IMGJOBS_COMPILE_CACHE_DIR=/models/inductor \
    IMGJOBS_MODEL_CACHE=/models/s3 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --gid 10001 imgjobs \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin imgjobs \
    && mkdir -p /models /etc/imgjobs \
    && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/worker-healthcheck.sh /usr/local/bin/imgjobs-worker-healthcheck
# Downloaded checkpoints (GBs each: the hub's in HF_HOME, those of s3:// sources in IMGJOBS_MODEL_CACHE),
# and compiled code for models that set `compile`: keep them on a volume so a new container neither
# fetches nor compiles them again.
VOLUME /models
# Numeric, so Kubernetes' runAsNonRoot can verify it without a runAsUser of its own.
USER 10001:10001
WORKDIR /home/imgjobs

# Answers while the model is still loading (Celery's main process replies, not the pool process that
# loads it), so the start period only covers interpreter and Celery start-up.
HEALTHCHECK --interval=60s --timeout=30s --start-period=2m --retries=3 CMD ["imgjobs-worker-healthcheck"]

# No init process in front: `imgjobs worker` execs Celery, which then is PID 1, receives SIGTERM
# directly (warm shutdown: the running chunk finishes) and reaps its own pool processes.
ENTRYPOINT ["imgjobs", "worker"]
