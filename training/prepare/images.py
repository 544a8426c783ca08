"""Check and write one image blob from a mirror: real JPEG, decodable, at most `max_side` pixels.

Mirrors hold LFS pointers, truncated uploads and the odd PNG renamed .jpg; each of those
must cost one line naming the file, never the run. A good JPEG that is already small
enough is written byte for byte (no re-encoding loss); a larger one is downscaled once.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from training.prepare.mirror import is_jpeg, is_lfs_pointer

JPEG_QUALITY = 90


class BadImage(ValueError):
    """A blob that is not a usable JPEG; the message says why in a few words."""


def check_jpeg(data: bytes) -> tuple[int, int]:
    """(width, height) of a decodable JPEG, or BadImage saying what the blob is instead."""
    if is_lfs_pointer(data):
        raise BadImage("Git LFS pointer, not the image")
    if not is_jpeg(data):
        raise BadImage(f"not a JPEG (starts {data[:4].hex() or 'empty'})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every scan: a truncated file fails here
            return image.size
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"JPEG does not decode ({error})") from None


def write_image(data: bytes, out: Path, max_side: int) -> tuple[int, int]:
    """Write `data` to `out` (atomically), downscaled when a side exceeds `max_side`; return the size written."""
    size = check_jpeg(data)
    if max(size) > max_side:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=JPEG_QUALITY)
            data, size = buffer.getvalue(), image.size
    partial = out.with_name(out.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, out)  # a killed run never leaves a half-written image under the real name
    return size
