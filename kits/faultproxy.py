"""A fault-injecting HTTP proxy for tests: it forwards every request to an upstream HTTP server (moto's
S3 server) and, while armed, answers some requests itself the way a struggling S3 does.

    with FaultProxy("http://127.0.0.1:5000") as proxy:     # point clients at proxy.url
        proxy.arm(["SlowDown", "InternalError"], first=20)  # the next 20 requests fail
        proxy.arm(["stall"], fraction=0.3, duration_s=5)    # 30% stall past the client timeout, for 5 s

Fault kinds (the S3 error XML is what S3 itself sends):

    InternalError       500 InternalError
    ServiceUnavailable  503 ServiceUnavailable
    SlowDown            503 SlowDown (throttling)
    RequestTimeout      400 RequestTimeout (S3's own "socket not read from in time")
    GatewayTimeout      504 from a load balancer in front of S3, no S3 body
    stall               no answer for stall_s seconds, then the connection is closed: a client read timeout
                        when stall_s is above the client's
    reset               the connection is reset before any answer
    truncate            the upstream answer, cut off half-way through its body

Only loopback, only what the test starts: the proxy listens on 127.0.0.1 (or the host given) and
talks to the one upstream it was given.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

S3_ERRORS: dict[str, tuple[int, str]] = {
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
    "SlowDown": (503, "Please reduce your request rate."),
    "RequestTimeout": (
        400,
        "Your socket connection to the server was not read from or written to within the timeout period.",
    ),
}
KINDS = (*S3_ERRORS, "GatewayTimeout", "stall", "reset", "truncate")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect"}


@dataclass
class FaultStats:
    requests: int = 0
    forwarded: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    first_fault_at: float | None = None
    last_fault_at: float | None = None
    # The first upstream answer below 500 after the last fault: when clients got through again.
    recovered_at: float | None = None

    @property
    def injected(self) -> int:
        return sum(self.faults.values())


@dataclass
class _Plan:
    kinds: tuple[str, ...]
    first: int
    fraction: float
    until: float | None
    methods: tuple[str, ...] | None
    path_contains: str | None
    served: int = 0


class FaultProxy:
    def __init__(
        self, upstream: str, host: str = "127.0.0.1", port: int = 0, *, stall_s: float = 65.0, seed: int = 0
    ) -> None:
        parts = urlsplit(upstream)
        assert parts.scheme == "http" and parts.hostname, f"an http:// upstream, not {upstream!r}"
        self.upstream = (parts.hostname, parts.port or 80)
        self.stall_s = stall_s
        self.stats = FaultStats()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._plan: _Plan | None = None
        self._closing = threading.Event()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the fault plan

    def arm(
        self,
        kinds: Sequence[str],
        *,
        first: int = 0,
        fraction: float = 0.0,
        duration_s: float | None = None,
        methods: tuple[str, ...] | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Fault the next `first` matching requests, then a `fraction` of them, until disarmed or
        duration_s has passed; kinds are taken in turn."""
        unknown = set(kinds) - set(KINDS)
        assert kinds and not unknown, f"unknown fault kinds {unknown}"
        with self._lock:
            self._plan = _Plan(
                kinds=tuple(kinds),
                first=first,
                fraction=fraction,
                until=time.monotonic() + duration_s if duration_s is not None else None,
                methods=methods,
                path_contains=path_contains,
            )

    def disarm(self) -> None:
        with self._lock:
            self._plan = None

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._active() is not None

    def _active(self) -> _Plan | None:
        plan = self._plan
        if plan is not None and plan.until is not None and time.monotonic() >= plan.until:
            self._plan = plan = None
        if plan is not None and plan.first and plan.served >= plan.first and not plan.fraction:
            self._plan = plan = None
        return plan

    def _choose(self, method: str, path: str) -> str | None:
        """The fault for this request, or None to forward it."""
        with self._lock:
            self.stats.requests += 1
            plan = self._active()
            if plan is None:
                return None
            if plan.methods is not None and method not in plan.methods:
                return None
            if plan.path_contains is not None and plan.path_contains not in path:
                return None
            if plan.served < plan.first or self._random.random() < plan.fraction:
                kind = plan.kinds[plan.served % len(plan.kinds)]
                plan.served += 1
                now = time.monotonic()
                self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1
                self.stats.first_fault_at = self.stats.first_fault_at or now
                self.stats.last_fault_at = now
                self.stats.recovered_at = None
                return kind
            return None

    def _forwarded(self, status: int) -> None:
        with self._lock:
            self.stats.forwarded += 1
            if status < 500 and self.stats.last_fault_at is not None and self.stats.recovered_at is None:
                self.stats.recovered_at = time.monotonic()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()  # read first, so a faulted request leaves the connection usable
        kind = self.owner._choose(self.command, self.path)
        if kind is None or kind == "truncate":
            self._forward(body, truncate=kind == "truncate")
        elif kind in S3_ERRORS:
            status, message = S3_ERRORS[kind]
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{kind}</Code><Message>{message}</Message>"
                f"<RequestId>faultproxy</RequestId></Error>"
            ).encode()
            self._reply(status, xml, "application/xml")
        elif kind == "GatewayTimeout":
            self._reply(504, b"<html><body>504 Gateway Time-out</body></html>", "text/html")
        elif kind == "stall":
            self.owner._closing.wait(self.owner.stall_s)
            self.close_connection = True
        elif kind == "reset":
            # SO_LINGER 0: close sends a RST, as a dropped load balancer connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes, *, truncate: bool) -> None:
        host, port = self.owner.upstream
        upstream = http.client.HTTPConnection(host, port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        except OSError:
            self._reply(502, b"upstream unreachable", "text/plain")
            return
        finally:
            upstream.close()
        self.owner._forwarded(response.status)
        self.send_response(response.status)
        for name, value in response.getheaders():
            # HEAD keeps the upstream's Content-Length: it is the object's size.
            if name.lower() in HOP_BY_HOP or (name.lower() == "content-length" and self.command != "HEAD"):
                continue
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if truncate and data:
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
