# syntax=docker/dockerfile:1
# GPU worker image: runs `imgjobs worker --model NAME`, one container per GPU.
#
#   docker build -f deploy/docker/worker.Dockerfile -t imgjobs-worker .     # from the repository root
#   docker run --gpus device=0 -e IMGJOBS_BROKER_URL=... -e IMGJOBS_MODELS=/etc/imgjobs/models.yaml \
#     -v ./deploy/models.example.yaml:/etc/imgjobs/models.yaml:ro -v imgjobs-models:/models \
#     imgjobs-worker --model sd15
#
# The base is plain Python rather than nvidia/cuda: torch's Linux wheels bring their own CUDA runtime
# and cuDNN (the nvidia-* wheels), so a CUDA base image would only add an unused second copy of
# several GB. The driver comes from the host through the NVIDIA container toolkit.
#
# Build arguments:
#   TORCH_SPEC       the torch requirement (default: the newest torch, whose Linux wheel is a CUDA build)
#   TORCH_INDEX_URL  an index of torch wheels for another CUDA version, e.g. PyTorch's cu126 index for
#                    hosts whose driver is too old for the default build; empty means pip's default

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first and alone: the largest layer stays cached while the project's code changes.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml README.md /src/
COPY schemas /src/schemas
COPY jobs /src/jobs
COPY workers /src/workers
RUN pip install /src

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --gid 10001 imgjobs \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin imgjobs \
    && mkdir -p /models /etc/imgjobs \
    && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/worker-healthcheck.sh /usr/local/bin/imgjobs-worker-healthcheck
# Downloaded checkpoints (GBs each): keep them on a volume so a new container does not fetch them again.
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
