"""The embedded Redis never outlives an interrupted start (it runs in its own session, where Ctrl-C
does not reach it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobs.embedded import EmbeddedRedis


def test_an_interrupted_start_stops_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(_self: redis.Redis, **_: object) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(redis.Redis, "ping", interrupted)
    server = EmbeddedRedis(tmp_path / "redis")
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.process is not None and server.process.poll() is not None  # it ran, and was stopped
