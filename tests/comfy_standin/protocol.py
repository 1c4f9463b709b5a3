"""Wire constants and feature-flag lookup, as in ComfyUI v0.8.0 (protocol.py, feature_flags.py)."""

from __future__ import annotations

from typing import Any


class BinaryEventTypes:
    """First uint32 of a binary frame; 2 is internal (encoded into 1 before sending)."""

    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


SERVER_FEATURES: dict[str, Any] = {
    "supports_preview_metadata": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
}


def supports_feature(sockets_metadata: dict[str, dict[str, Any]], sid: Any, feature: str) -> bool:
    """Whether the socket ``sid`` negotiated ``feature`` (False for None or unknown sids)."""
    if sid not in sockets_metadata:
        return False
    return sockets_metadata[sid].get("feature_flags", {}).get(feature, False) is True
