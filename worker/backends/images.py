"""What kind of image a message's base64 bytes hold: every wire format but Ollama's wants a
media type beside the data, and corral's messages carry only the bytes."""

from __future__ import annotations

import base64
import binascii

__all__ = ["image_media_type", "sniff_image_type"]

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_image_type(image_base64: str) -> str | None:
    """PNG, JPEG, GIF or WebP, read off the image's first bytes; None for anything else."""
    head64 = image_base64[:16]
    try:
        head = base64.b64decode(head64 + "=" * (-len(head64) % 4))
    except (binascii.Error, ValueError):
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def image_media_type(image_base64: str) -> str:
    """The media type a data: URL needs (PNG if the bytes do not say)."""
    return sniff_image_type(image_base64) or "image/png"
