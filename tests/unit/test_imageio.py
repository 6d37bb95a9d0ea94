"""Input decoding: limits hold before decoding, odd but valid images become plain RGB, and each
resize policy brings an input to its size as documented."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.errors import InputImageError
from schemas.job import ResizePolicy
from schemas.settings import Settings
from workers.imageio import decode_image, fetch_bytes, fit_image, load_input

SETTINGS = Settings(max_image_bytes=200_000, max_image_pixels=1_000_000)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height: a few hundred bytes, huge when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * (width * 3 + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "^mem://x: empty file, not an image$"),
        (b"GIF89a-but-not-really" * 3, "not a recognized image|cannot decode"),
        (
            b"\x00\x01\x02 wrong magic",
            r"^mem://x: not a recognized image \(PNG, JPEG, WEBP, BMP, TIFF or GIF\)$",
        ),
        (png_bytes(Image.new("RGB", (64, 64)))[:60], "cannot decode"),
        (bomb_png(20_000, 20_000), "pixel"),
    ],
    ids=["zero-byte", "bad-gif", "wrong-magic", "truncated", "decompression-bomb"],
)
def test_bad_images_are_input_errors(data: bytes, message: str) -> None:
    with pytest.raises(InputImageError, match=message):
        decode_image(data, "mem://x", SETTINGS)


def test_format_outside_the_allow_list_is_refused() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PPM")
    with pytest.raises(InputImageError, match=r"^mem://x\.ppm: not a recognized image \("):
        decode_image(buffer.getvalue(), "mem://x.ppm", SETTINGS)


def test_files_over_the_byte_limit_are_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x00" * (SETTINGS.max_image_bytes + 1))
    with pytest.raises(InputImageError, match="byte limit"):
        fetch_bytes(str(path), SETTINGS)
    with pytest.raises(InputImageError, match="No such file"):
        fetch_bytes(str(tmp_path / "missing.png"), SETTINGS)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "LA", "1"])
def test_modes_are_converted_to_rgb(mode: str) -> None:
    image = (
        Image.new("RGB", (16, 8), (200, 100, 50)).convert(mode)
        if mode != "I;16"
        else Image.new("I;16", (16, 8), 40000)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    decoded = decode_image(buffer.getvalue(), "mem://x", SETTINGS)
    assert decoded.mode == "RGB" and decoded.size == (16, 8)
    if mode == "I;16":
        assert decoded.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256, not clipped to white


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), "mem://x.jpg", SETTINGS).size == (20, 40)


def test_load_input_center_crops_to_the_target_size(tmp_path: Path) -> None:
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    image.paste((255, 255, 255), (25, 0, 75, 50))  # white middle half
    path = tmp_path / "wide.png"
    image.save(path)
    fitted = load_input(f"file://{path}", (32, 32), SETTINGS)
    assert fitted.size == (32, 32)
    # Cropped, not squashed: the black sides are gone (squashing would leave the outer quarters black).
    assert np.asarray(fitted).min() > 200


GREEN, RED, BLUE, YELLOW, BLACK = (0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0)


def four_bands() -> Image.Image:
    """40x20, four vertical 10-pixel bands: green, red, blue, yellow. The outer bands tell a crop
    (they go) from a stretch (they stay), which two halves alone would not."""
    image = Image.new("RGB", (40, 20))
    for index, colour in enumerate((GREEN, RED, BLUE, YELLOW)):
        image.paste(colour, (10 * index, 0, 10 * index + 10, 20))
    return image


def assert_colour(image: Image.Image, xy: tuple[int, int], expected: tuple[int, int, int]) -> None:
    # LANCZOS rings a little near band edges; the pixels probed here sit inside a band.
    pixel = image.getpixel(xy)
    assert isinstance(pixel, tuple)
    assert max(abs(int(a) - b) for a, b in zip(pixel, expected, strict=True)) <= 16, (xy, pixel, expected)


def test_crop_covers_the_size_and_cuts_the_outer_bands() -> None:
    fitted = fit_image(four_bands(), (16, 16), "crop")
    assert (fitted.mode, fitted.size) == ("RGB", (16, 16))
    for y in (0, 8, 15):
        assert_colour(fitted, (2, y), RED)
        assert_colour(fitted, (13, y), BLUE)
    assert np.asarray(fitted)[..., 1].max() <= 16, "no green or yellow: the outer quarters are cut off"


def test_fit_stretches_keeping_every_band() -> None:
    fitted = fit_image(four_bands(), (16, 16), "fit")
    assert (fitted.mode, fitted.size) == ("RGB", (16, 16))
    for y in (0, 8, 15):  # full height: nothing padded
        for x, colour in ((2, GREEN), (6, RED), (9, BLUE), (13, YELLOW)):
            assert_colour(fitted, (x, y), colour)


def test_pad_keeps_the_aspect_ratio_between_black_bars() -> None:
    fitted = fit_image(four_bands(), (16, 16), "pad")
    assert (fitted.mode, fitted.size) == ("RGB", (16, 16))
    pixels = np.asarray(fitted)
    # 40x20 scales to 16x8, centred: rows 0-3 and 12-15 are the padding.
    assert (pixels[:4] == 0).all() and (pixels[12:] == 0).all()
    for y in (4, 8, 11):
        for x, colour in ((2, GREEN), (6, RED), (9, BLUE), (13, YELLOW)):
            assert_colour(fitted, (x, y), colour)


@pytest.mark.parametrize("policy", ["crop", "fit", "pad"])
def test_every_policy_gives_exactly_the_size_in_rgb(policy: ResizePolicy) -> None:
    image = Image.new("RGBA", (33, 70), (10, 20, 30, 40))
    for size in ((16, 16), (24, 8), (17, 9)):
        fitted = fit_image(image, size, policy)
        assert (fitted.mode, fitted.size) == ("RGB", size)
    same = Image.new("RGB", (16, 8))
    assert fit_image(same, (16, 8), policy) is same, "already the size: left as it is"


def test_load_input_applies_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "bands.png"
    four_bands().save(path)
    padded = load_input(f"file://{path}", (16, 16), SETTINGS, "pad")
    assert padded.getpixel((8, 0)) == BLACK
    assert_colour(load_input(f"file://{path}", (16, 16), SETTINGS), (2, 8), RED)  # crop by default


def test_an_s3_uri_s3_can_never_accept_fails_the_item_without_retries() -> None:
    # A StorageError (retryable) before: five chunk retries, then the whole chunk failed.
    with pytest.raises(InputImageError, match="Invalid bucket name"):
        fetch_bytes("s3://bad_bucket!/x.png", Settings())


def test_a_transparent_input_is_composited_on_white_not_stripped_of_alpha() -> None:
    rgba = Image.new("RGBA", (4, 1), (255, 0, 0, 0))  # hidden red under full transparency
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    rgba.putpixel((2, 0), (10, 200, 30, 255))  # opaque
    decoded = decode_image(png_bytes(rgba), "rgba.png", SETTINGS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    grey = decoded.getpixel((1, 0))
    assert isinstance(grey, tuple) and all(abs(channel - 127) <= 1 for channel in grey)
    assert decoded.getpixel((2, 0)) == (10, 200, 30)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)  # palette entry 0 (red) is transparent
    decoded = decode_image(buffer.getvalue(), "palette.png", SETTINGS)
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]
