"""Where a photo's XMP sidecar lives, and which photos must get one.

Two naming conventions exist and tools disagree:
- "default": `IMG_1.jpg.xmp` (darktable, digiKam, Immich): one sidecar per file, so
  `IMG_1.jpg` and `IMG_1.CR2` never share one.
- "adobe": `IMG_1.xmp` (Lightroom, Bridge, Capture One): the RAW+JPEG pair shares it.
"""

from __future__ import annotations

from pathlib import Path

SIDECAR_NAMES = ("default", "adobe")

# exiftool's File:FileType (sniffed from the content, not the extension) of the
# formats written in place. Everything else (HEIC/HEIF, AVIF, camera RAW, DNG, GIF,
# MPO, ...) gets a sidecar even in in-place mode: RAW files are the photographer's
# negatives, HEIC rewriting is young in every tool, and a sidecar is never a risk.
IN_PLACE_TYPES = frozenset({"JPEG", "PNG", "WEBP", "Extended WEBP", "TIFF"})


def sidecar_path(photo: Path, sidecar_name: str = "default") -> Path:
    """The sidecar that belongs to photo under the chosen naming convention."""
    if sidecar_name == "default":
        return photo.with_name(photo.name + ".xmp")
    if sidecar_name == "adobe":
        return photo.with_suffix(".xmp")
    raise ValueError(f"sidecar_name must be one of {', '.join(SIDECAR_NAMES)}, not {sidecar_name!r}")


def writes_in_place(file_type: str | None) -> bool:
    """Can this format (exiftool File:FileType) be rewritten in place safely?"""
    return file_type in IN_PLACE_TYPES
