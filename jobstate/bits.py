"""Bits as Redis numbers them in a bitmap (bit 0 is the first byte's most significant bit): reading
bitmaps fetched whole, and the slot masks that chunk messages carry."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator


def bit(data: bytes, index: int) -> bool:
    byte = index >> 3
    return byte < len(data) and bool(data[byte] >> (7 - (index & 7)) & 1)


def any_bit(data: bytes, positions: range) -> bool:
    """Whether any bit of `positions` (a step-1 range) is set."""
    if not positions:
        return False
    first, last = positions.start >> 3, (positions.stop - 1) >> 3
    if first >= len(data):
        return False
    # Whole bytes inside the range at once; bits at the two ends one by one.
    inner = data[first + 1 : last]
    return any(inner) or any(bit(data, index) for index in (*positions[:8], *positions[-8:]))


def ones(data: bytes, limit: int) -> Iterator[int]:
    """The positions below `limit` whose bit is set, a byte at a time (zero bytes are passed over)."""
    for index, byte in enumerate(data[: (limit + 7) // 8]):
        if byte:
            for offset in range(8):
                position = index * 8 + offset
                if byte & (0x80 >> offset) and position < limit:
                    yield position


def zeros(data: bytes, limit: int) -> Iterator[int]:
    """The positions below `limit` whose bit is not set (a bitmap shorter than that reads as zeros)."""
    padded = data[: (limit + 7) // 8].ljust((limit + 7) // 8, b"\0")
    for index, byte in enumerate(padded):
        if byte != 0xFF:
            for offset in range(8):
                position = index * 8 + offset
                if not byte & (0x80 >> offset) and position < limit:
                    yield position


def mask(slots: Iterable[int], count: int) -> str:
    """Slots (0 .. count - 1) as a bitmap, base64: how a chunk names a subset of its part's items."""
    data = bytearray((count + 7) // 8)
    for slot in slots:
        data[slot >> 3] |= 0x80 >> (slot & 7)
    return base64.b64encode(bytes(data)).decode()


def unmask(encoded: str) -> bytes:
    return base64.b64decode(encoded)
