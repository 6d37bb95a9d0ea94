"""Redis clients, built one way for every process that talks to the broker. A command and a worker
differ only in how long they wait for a broker that is away (Reconnect): a command says so in one
line after a few seconds, a worker rides out a restart or a failover rather than fail its chunk."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from schemas.errors import BrokerUnavailableError, ConfigError
from schemas.settings import redact_url

SOCKET_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Reconnect:
    """How a client rides out a broker that is away: each command is tried `retries` more times, with
    exponential backoff from 0.2 s up to `cap_s` between the tries."""

    retries: int
    cap_s: float
    connect_timeout_s: float
    health_check_s: int = 0  # ping a connection idle this long before using it; 0: never


# A command: a broker restarting is normal, so a few tries over a few seconds, then one line.
COMMAND = Reconnect(retries=2, cap_s=2.0, connect_timeout_s=5.0)
# A worker: about a minute, a broker's restart or failover, instead of failing the chunk in hand.
WORKER = Reconnect(retries=20, cap_s=5.0, connect_timeout_s=10.0, health_check_s=30)
# A server this process has just started: asked again and again until it answers.
PROBE = Reconnect(retries=0, cap_s=0.0, connect_timeout_s=1.0)


def redis_client(url: str, reconnect: Reconnect = COMMAND) -> redis.Redis:
    """A client of the Redis at `url` (replies decoded as text); it connects when first used."""
    try:
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=reconnect.connect_timeout_s,
            socket_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=reconnect.cap_s, base=0.2), reconnect.retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            health_check_interval=reconnect.health_check_s,
        )
    except ValueError as exc:  # a bad port, database or scheme; redis-py's message may quote the password
        raise ConfigError(
            f"IMGJOBS_BROKER_URL {redact_url(url)} is not a valid Redis URL"
            f" ({type(exc).__name__}); percent-encode '/', '?', '#' and '@' in a password"
        ) from None


def connect_redis(url: str, reconnect: Reconnect = COMMAND) -> redis.Redis:
    """A client that answered a ping."""
    client = redis_client(url, reconnect)
    try:
        client.ping()
    except redis.AuthenticationError:
        given = client.connection_pool.connection_kwargs
        where = f"Redis at {given.get('host')}:{given.get('port')}"
        if given.get("password") is None:
            raise ConfigError(
                f"{where} asks for a password: give it in IMGJOBS_BROKER_URL as redis://:PASSWORD@host:port/db"
            ) from None
        raise ConfigError(f"{where} refused the user or password of IMGJOBS_BROKER_URL") from None
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"cannot reach the broker at {redact_url(url)}: {exc}") from None
    return client
