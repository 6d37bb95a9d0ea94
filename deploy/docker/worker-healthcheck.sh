#!/bin/sh
# Health check of an `imgjobs worker` container: this container's own Celery node must answer a ping.
#
# `imgjobs worker` names its node `imgjobs.<model>.<pid>@%h` and then execs Celery, so the node name
# is in the worker's command line; the image has no init process, so the worker is PID 1. Reading the
# name from there keeps this script independent of the model and of how the container was started.
#
# It uses Celery's default app (`celery inspect`, no `-A workers.app`): loading the project's app
# would import torch on every probe, seconds of CPU and hundreds of MB, to send the same ping.
# The broker URL goes through the environment, not argv, so its password stays out of `ps`.
set -eu

pid="${IMGJOBS_WORKER_PID:-1}"
node=$(tr '\0' '\n' <"/proc/$pid/cmdline" | sed -n '/^--hostname$/{n;p;q;}')
if [ -z "$node" ]; then
    echo "unhealthy: process $pid is not a Celery worker started by \`imgjobs worker\`" >&2
    exit 1
fi
node=$(printf '%s' "$node" | sed "s/%h/$(cat /proc/sys/kernel/hostname)/g")
: "${IMGJOBS_BROKER_URL:?IMGJOBS_BROKER_URL is not set}"

CELERY_BROKER_URL="$IMGJOBS_BROKER_URL" exec celery inspect ping \
    --destination "$node" --timeout "${IMGJOBS_HEALTHCHECK_TIMEOUT_S:-10}"
