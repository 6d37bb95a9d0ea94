"""http(s) inputs against a server on loopback: size limits, errors, and no redirect to another scheme."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from schemas.errors import InputImageError
from schemas.settings import Settings
from workers.imageio import fetch_bytes, load_input

# The test server is on loopback, which inputs may reach only when allowed.
SETTINGS = Settings(max_image_bytes=50_000, http_timeout_s=5, http_allow_private=True)
PNG = io.BytesIO()
Image.new("RGB", (40, 20), (0, 128, 255)).save(PNG, format="PNG")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        redirects = {
            "/to-ok": "/ok.png",
            "/to-ftp": "ftp://127.0.0.1/x.png",
            "/to-file": "file:///etc/passwd",
        }
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.end_headers()
        elif self.path == "/ok.png":
            self._send(PNG.getvalue())
        elif self.path == "/big":
            self._send(b"\x00" * (SETTINGS.max_image_bytes + 1))
        elif self.path == "/trickle":
            # A byte every 0.3 s: each receive beats a 1 s socket timeout, the whole read never ends.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_images_are_fetched_and_same_scheme_redirects_followed(base_url: str) -> None:
    assert load_input(f"{base_url}/ok.png", (16, 16), SETTINGS).size == (16, 16)
    assert fetch_bytes(f"{base_url}/to-ok", SETTINGS) == PNG.getvalue()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/missing", "HTTP 404"),
        ("/big", "byte limit"),
        ("/to-ftp", "refusing a redirect from http:// to ftp://"),
        ("/to-file", "Redirection to url 'file:///etc/passwd' is not allowed"),
    ],
)
def test_bad_http_inputs_fail_the_item(base_url: str, path: str, message: str) -> None:
    with pytest.raises(InputImageError, match=message):
        fetch_bytes(f"{base_url}{path}", SETTINGS)


def test_private_addresses_are_refused_unless_allowed(base_url: str) -> None:
    strict = SETTINGS.model_copy(update={"http_allow_private": False})
    with pytest.raises(InputImageError, match=r"127\.0\.0\.1 is a private or local address"):
        fetch_bytes(f"{base_url}/ok.png", strict)
    with pytest.raises(InputImageError, match=r"169\.254\.169\.254 is a private or local address"):
        fetch_bytes("http://169.254.169.254/latest/meta-data/", strict)


def test_a_trickling_server_is_cut_off_at_the_timeout(base_url: str) -> None:
    quick = SETTINGS.model_copy(update={"http_timeout_s": 1})
    started = time.monotonic()
    with pytest.raises(InputImageError, match="not read within the time limit"):
        fetch_bytes(f"{base_url}/trickle", quick)
    assert time.monotonic() - started < 3  # read(n) waited for all n bytes: 300 s here


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://127.0.0.1:abc/x.png"])
def test_urls_urllib_cannot_parse_fail_the_item(url: str) -> None:
    with pytest.raises(InputImageError, match=r"x\.png"):
        fetch_bytes(url, SETTINGS)


def test_a_name_that_rebinds_to_a_private_address_is_refused(
    base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    port = int(base_url.rsplit(":", 1)[1])
    real_getaddrinfo = socket.getaddrinfo
    public_once = [[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]]

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        """DNS rebinding: a public answer for the check, then the worker's own loopback."""
        if host != "rebind.test":
            return real_getaddrinfo(host, *args, **kwargs)
        return public_once.pop() if public_once else real_getaddrinfo("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    strict = SETTINGS.model_copy(update={"http_allow_private": False})
    # The connection must use the address that was checked: resolving the name again would reach the
    # loopback server.
    with pytest.raises(InputImageError, match=r"private or local address \(127\.0\.0\.1\)"):
        fetch_bytes(f"http://rebind.test:{port}/ok.png", strict)
