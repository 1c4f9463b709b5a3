"""Preview images and the binary websocket frames that carry them (protocol §4).

A real sampler preview is a 512 px JPEG of 25-60 KB. The simulator sends a valid 8x8 grey
baseline JPEG padded with a comment segment to a realistic size, so clients exercise the same
frame sizes without the simulator needing an image library.
"""

from __future__ import annotations

import json
import struct
from typing import Any

PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
_JPEG_TYPE = 1
_COMMENT_LIMIT = 65533


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def preview_jpeg(label: str, size: int = 24_000) -> bytes:
    """An 8x8 mid-grey JPEG of about ``size`` bytes whose comment names ``label``."""
    single_code = bytes([1] + [0] * 15) + b"\x00"  # one Huffman code of length 1, symbol 0
    head = b"".join(
        (
            b"\xff\xd8",
            _segment(0xFFE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            _segment(0xFFDB, b"\x00" + b"\x01" * 64),
            _segment(0xFFC0, b"\x08\x00\x08\x00\x08\x01\x01\x11\x00"),
            _segment(0xFFC4, b"\x00" + single_code),
            _segment(0xFFC4, b"\x10" + single_code),
        )
    )
    tail = _segment(0xFFDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x3f\xff\xd9"
    text = f"tower-progress simulated preview: {label} ".encode()
    room = max(len(text), min(_COMMENT_LIMIT, size - len(head) - len(tail) - 4))
    comment = (text * (room // len(text) + 1))[:room]
    return head + _segment(0xFFFE, comment) + tail


def preview_payload(jpeg: bytes) -> bytes:
    """Binary event 1 (PREVIEW_IMAGE) after its event type: image type (1 = JPEG), image."""
    return struct.pack(">I", _JPEG_TYPE) + jpeg


def preview_payload_with_metadata(jpeg: bytes, metadata: dict[str, Any]) -> bytes:
    """Binary event 4 after its event type: JSON length, the metadata JSON, image bytes."""
    encoded = json.dumps(metadata).encode()
    return struct.pack(">I", len(encoded)) + encoded + jpeg
