"""Fetching and decoding input images, bounded in bytes and pixels before any decoding happens,
and encoding outputs."""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from PIL import Image, ImageOps, UnidentifiedImageError

from jobstate.storage import s3_client, split_s3_uri
from schemas.errors import InputImageError, StorageError
from schemas.job import ResizePolicy
from schemas.settings import LocalRoots, Settings

if TYPE_CHECKING:
    import torch

# Formats we decode; everything else is refused before a decoder runs.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")


READ_BLOCK = 1 << 16
# Errors of the object itself, not of the service: the item fails at once instead of being retried.
PERMANENT_S3_ERRORS = frozenset(
    {
        "NoSuchKey",
        "404",
        "NoSuchBucket",
        "AccessDenied",
        "403",
        "InvalidBucketName",
        "InvalidObjectState",
        "KeyTooLongError",
    }
)


def _read_limited(stream: Any, limit: int, uri: str, deadline: float | None = None) -> bytes:
    """At most `limit` bytes, in blocks, and (for network reads) before `deadline`: a server that
    trickles bytes cannot hold a worker past its timeout. With a deadline, read1 returns after one
    receive; read(n) would wait for all n bytes, a byte per socket timeout if the server trickles."""
    read = stream.read1 if deadline is not None else stream.read
    blocks, size = [], 0
    while block := read(min(READ_BLOCK, limit + 1 - size)):
        blocks.append(block)
        size += len(block)
        if size > limit:
            raise InputImageError(f"{uri}: larger than the {limit}-byte limit")
        if deadline is not None and time.monotonic() > deadline:
            raise InputImageError(f"{uri}: not read within the time limit")
    return b"".join(blocks)


def _global_addresses(host: str, port: int | None, url: str) -> list[tuple[Any, ...]]:
    """getaddrinfo's answers for host, refused unless every address is global (not private,
    loopback, link-local or reserved): an item's URL must not reach the worker's own network
    (metadata services, internal hosts)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InputImageError(f"{url}: cannot resolve {host}: {exc}") from None
    for info in infos:
        address = str(info[4][0])
        if not ipaddress.ip_address(address.split("%", 1)[0]).is_global:
            raise InputImageError(
                f"{url}: {host} is a private or local address ({address}); "
                "IMGJOBS_HTTP_ALLOW_PRIVATE=true allows it"
            )
    return infos


def _check_public(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise InputImageError(f"{url}: no host")
    _global_addresses(host, None, url)


def _connect_global(
    address: tuple[str, int], timeout: Any = None, source_address: Any = None
) -> socket.socket:
    """socket.create_connection, to an address checked in the same resolution. Checking a name and
    then letting the connection resolve it again would let a DNS answer that changes in between
    (rebinding) reach a private address."""
    host, port = address
    last_error: OSError | None = None
    for family, kind, proto, _name, sockaddr in _global_addresses(host, port, f"{host}:{port}"):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise last_error or OSError(f"cannot connect to {host}:{port}")


# http.client connects through the connection's _create_connection (socket.create_connection by
# default); these connect only to checked addresses. TLS still verifies, and sends SNI for, the name.
class _GlobalHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_global


class _GlobalHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_global


class _GlobalHTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_GlobalHTTPConnection, req, **kwargs)


class _GlobalHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_GlobalHTTPSConnection, req, **kwargs)


def _opener(url: str, allow_private: bool) -> urllib.request.OpenerDirector:
    handlers: list[Any] = [_CheckedRedirects(allow_private)]
    parts = urllib.parse.urlsplit(url)
    proxied = parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(
        parts.hostname or ""
    )
    # Through a proxy (from the environment, like every urllib client) the connection goes to the
    # proxy, an address the operator chose: only the item's host name is checked then.
    if not allow_private and not proxied:
        handlers += [_GlobalHTTPHandler(), _GlobalHTTPSHandler()]
    return urllib.request.build_opener(*handlers)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within http(s), never from https down to http, and (unless allowed)
    never to a private address."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise InputImageError(f"{req.full_url}: refusing a redirect from {old}:// to {new}://")
        if not self.allow_private:
            _check_public(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_bytes(uri: str, settings: Settings, roots: LocalRoots | None = None) -> bytes:
    """The input's bytes. A local path is read only under `roots`, where given (the worker's path)."""
    limit = settings.max_image_bytes
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        try:
            obj = s3_client().get_object(Bucket=bucket, Key=key)
            if obj.get("ContentLength", 0) > limit:
                raise InputImageError(f"{uri}: larger than the {limit}-byte limit")
            # Reading the body is network I/O too: a connection cut mid-body (IncompleteReadError,
            # ResponseStreamingError) or a read timeout is retryable, not a bad image.
            return _read_limited(obj["Body"], limit, uri)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in PERMANENT_S3_ERRORS:
                raise InputImageError(f"{uri}: {code}") from None
            raise StorageError(f"{uri}: {exc}") from None
        except ParamValidationError as exc:  # a bucket or key S3 can never accept: no retry helps
            raise InputImageError(f"{uri}: {exc}") from None
        except BotoCoreError as exc:
            raise StorageError(f"{uri}: {exc}") from None
    if uri.startswith(("http://", "https://")):
        try:
            if not settings.http_allow_private:
                # Besides the check at connect time: this one's error names the URL, and through a
                # proxy it is the only check.
                _check_public(uri)
            with _opener(uri, settings.http_allow_private).open(
                uri, timeout=settings.http_timeout_s
            ) as response:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > limit:
                    raise InputImageError(f"{uri}: larger than the {limit}-byte limit")
                return _read_limited(response, limit, uri, time.monotonic() + settings.http_timeout_s)
        except urllib.error.HTTPError as exc:
            raise InputImageError(f"{uri}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
            raise InputImageError(f"{uri}: {exc}") from None
        except ValueError as exc:  # a URL urllib cannot parse: "http://[::1/x", "http://h:port/x"
            raise InputImageError(f"{uri}: not a usable URL: {exc}") from None
    path = Path(uri.removeprefix("file://"))
    if roots is not None:
        roots.check(uri, path)
    try:
        if path.stat().st_size > limit:
            raise InputImageError(f"{uri}: larger than the {limit}-byte limit")
        with path.open("rb") as handle:
            return _read_limited(handle, limit, uri)
    except OSError as exc:
        raise InputImageError(f"{uri}: {exc.strerror or exc}") from None


def decode_image(data: bytes, uri: str, settings: Settings) -> Image.Image:
    """RGB image with EXIF orientation applied; refuses bombs before decoding pixels."""
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse outright.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = opened.size
            if width * height > settings.max_image_pixels:
                raise InputImageError(
                    f"{uri}: {width}x{height} is above the {settings.max_image_pixels}-pixel limit"
                )
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grey: scale to 8 bits rather than let convert() clip everything to white.
                image = image.point(lambda v: v / 256).convert("L")
            return _flattened(image)
    except InputImageError:
        raise
    except UnidentifiedImageError:
        # Pillow's message names the in-memory buffer it was given, not the input.
        formats = f"{', '.join(ALLOWED_FORMATS[:-1])} or {ALLOWED_FORMATS[-1]}"
        what = f"not a recognized image ({formats})" if data else "empty file, not an image"
        raise InputImageError(f"{uri}: {what}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputImageError(f"{uri}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputImageError(f"{uri}: cannot decode: {exc}") from None


PAD_COLOR = (0, 0, 0)
# Where an input is transparent, what shows through: its hidden colour channels often hold whatever
# the editor left there, which dropping alpha would bring out.
ALPHA_BACKGROUND = (255, 255, 255)


def _flattened(image: Image.Image) -> Image.Image:
    """RGB, a transparent image composited on ALPHA_BACKGROUND."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, size: tuple[int, int], policy: ResizePolicy) -> Image.Image:
    """An RGB image of exactly size=(width, height): crop covers the size and center-crops, fit
    stretches, pad fits inside and pads centrally with black (see schemas.job.ResizePolicy)."""
    if image.mode != "RGB":  # first, since pad's canvas takes the image's mode
        image = image.convert("RGB")
    if image.size == size:
        return image
    resample = Image.Resampling.LANCZOS
    if policy == "crop":
        return ImageOps.fit(image, size, method=resample)
    if policy == "fit":
        return image.resize(size, resample)
    return ImageOps.pad(image, size, method=resample, color=PAD_COLOR, centering=(0.5, 0.5))


def load_input(
    uri: str,
    size: tuple[int, int] | None,
    settings: Settings,
    policy: ResizePolicy = "crop",
    roots: LocalRoots | None = None,
) -> Image.Image:
    """Fetch, decode and, with a size=(width, height), bring to it as `policy` says."""
    image = decode_image(fetch_bytes(uri, settings, roots), uri, settings)
    return image if size is None else fit_image(image, size, policy)


def image_tensor(image: Image.Image, pinned: bool = False) -> torch.Tensor:
    """The RGB image as a uint8 (3, height, width) tensor: the bytes diffusers' preprocessing starts from
    (np.array(image)), channels first, for the device to normalize. `pinned`: in page-locked memory, which
    a GPU copies from without blocking the host. Made where the image was decoded (an I/O thread), so
    the thread that drives the GPU never converts pixels."""
    import numpy as np
    import torch  # here: the workers that only resize or end jobs never load torch for this module

    if image.mode != "RGB":
        raise ValueError(f"image_tensor takes RGB images, not {image.mode}")
    tensor = torch.empty((3, image.height, image.width), dtype=torch.uint8, pin_memory=pinned)
    # One transposing copy by numpy, which keeps to this thread: torch's copy would start its own
    # thread pool on every I/O thread at once.
    np.copyto(tensor.numpy(), np.asarray(image).transpose(2, 0, 1))
    return tensor


def encode_image(image: Image.Image, image_format: str = "png", quality: int | None = None) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": quality} if quality is not None and image_format in ("jpeg", "webp") else {}
    image.save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()
