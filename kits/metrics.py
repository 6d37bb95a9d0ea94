"""A worker's Prometheus metrics, as a scraper reads them (prometheus_client's own parser)."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int, timeout: float = 60, host: str = "127.0.0.1") -> str:
    """The metrics page served on `port`, once something serves it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            assert time.monotonic() < deadline, f"nothing serves metrics on port {port}"
            time.sleep(0.2)


def samples(metrics: str, name: str, **labels: str) -> list[float]:
    """The values of the samples called `name` whose labels include `labels`."""
    return [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of the first sample called `name` whose labels include `labels`."""
    found = samples(metrics, name, **labels)
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    assert found, f"no {name}{{{wanted}}} in metrics"
    return found[0]


def total(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 where there is none)."""
    return sum(samples(metrics, name, **labels))
