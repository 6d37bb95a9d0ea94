"""`imgjobs metrics`: the producer side's Prometheus exporter, read from Redis at each scrape:
chunks waiting per model queue (all priorities together), and the items of unfinished jobs by state."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from jobstate.store import JobStore
from schemas.errors import UnknownJobError
from schemas.messages import queue_of_list
from schemas.registry import QUEUE_PREFIX


class BrokerCollector(Collector):
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.store = JobStore(client)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "imgjobs_queue_depth", "Chunks waiting in a model's queue", labels=["queue"]
        )
        # Celery's Redis transport keeps each queue as a list per priority (schemas.messages.priority_lists):
        # a queue's depth is the sum over its lists, whichever of them exist now.
        waiting: dict[str, int] = {}
        for name in self.client.scan_iter(match=f"{QUEUE_PREFIX}*", _type="list"):
            queue = queue_of_list(name.decode() if isinstance(name, bytes) else str(name))
            waiting[queue] = waiting.get(queue, 0) + int(self.client.llen(name))
        for queue in sorted(waiting):
            depth.add_metric([queue], float(waiting[queue]))
        yield depth
        items = GaugeMetricFamily(
            "imgjobs_job_items", "Items of unfinished jobs, by state", labels=["job_id", "state"]
        )
        for job_id in sorted(self.store.job_ids()):
            try:
                status = self.store.status(job_id)
            except UnknownJobError:
                continue  # pruned since the listing
            if status.finished:
                continue
            for state in ("pending", "running", "succeeded", "failed"):
                items.add_metric([status.job_id, state], float(getattr(status, state)))
        yield items
