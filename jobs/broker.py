"""Connections from the producer side: Redis for job state, a Celery app that sends tasks by name."""

from __future__ import annotations

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from schemas.errors import BrokerUnavailableError, ConfigError
from schemas.settings import Settings, celery_config, redact_url

CONNECT_TIMEOUT_S = 5.0
CONNECT_ATTEMPTS = 3


def require_broker_url(settings: Settings) -> str:
    if not settings.broker_url:
        raise ConfigError(
            "no broker configured: set IMGJOBS_BROKER_URL=redis://host:6379/0 (or use `imgjobs run`)"
        )
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        raise ConfigError(
            f"IMGJOBS_BROKER_URL must be redis:// or rediss://, got {redact_url(settings.broker_url)}"
        )
    return settings.broker_url


def connect_redis(broker_url: str) -> redis.Redis:
    """A client that answered a ping, after a few tries with backoff (a broker restarting is normal)."""
    try:
        client = redis.Redis.from_url(
            broker_url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=30,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.2), CONNECT_ATTEMPTS - 1),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
    except ValueError as exc:  # a bad port, database or scheme; redis-py's message may quote the password
        raise ConfigError(
            f"IMGJOBS_BROKER_URL {redact_url(broker_url)} is not a valid Redis URL"
            f" ({type(exc).__name__}); percent-encode '/', '?', '#' and '@' in a password"
        ) from None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"cannot reach the broker at {redact_url(broker_url)}: {exc}") from None
    return client


def producer_app(settings: Settings, broker_url: str) -> Celery:
    app = Celery("imgjobs-producer")
    app.conf.update(celery_config(settings, broker_url))
    return app
