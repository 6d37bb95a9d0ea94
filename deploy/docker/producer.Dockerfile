# syntax=docker/dockerfile:1
# Producer image: the `imgjobs` CLI without torch or CUDA (submit, status, validate, models), plus
# Celery's own CLI and Flower for monitoring.
#
#   docker build -f deploy/docker/producer.Dockerfile -t imgjobs-producer .   # from the repository root
#   docker run --rm -e IMGJOBS_BROKER_URL=... -v "$PWD/job:/work:ro" imgjobs-producer submit job.yaml
#   docker run --rm -e IMGJOBS_BROKER_URL=... imgjobs-producer status JOB_ID --watch
#   docker run --rm -p 127.0.0.1:5555:5555 -e CELERY_BROKER_URL=... -e FLOWER_BASIC_AUTH=admin:... \
#     --entrypoint celery imgjobs-producer flower --port=5555
#
# Flower and `celery inspect` use Celery's default app, configured from CELERY_BROKER_URL; no project
# code is needed for them. Flower answers its API only with a login (FLOWER_BASIC_AUTH=user:password).
# Scheduled pipelines and the hourly prune run from this image too: `imgjobs schedule beat` and
# `imgjobs schedule worker` (compose's beat and scheduler services).
#
# `imgjobs run` and `imgjobs demo` need local workers and torch: they belong to the worker image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY deploy/docker/producer_requirements.py /tmp/
RUN python /tmp/producer_requirements.py /src/pyproject.toml >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "flower>=2.0,<3"
# The workers package is left out: nothing on this side imports it.
COPY schemas /src/schemas
COPY jobstate /src/jobstate
COPY jobs /src/jobs
RUN pip install --no-deps /src

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
RUN groupadd --gid 10001 imgjobs \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin imgjobs
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /work

ENTRYPOINT ["imgjobs"]
CMD ["--help"]
