"""Decoding untrusted image files and bytes into RGB pictures, with limits."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# 50 MP is far more than any photo needs; larger files are decompression bombs or scans.
MAX_PIXELS = 50_000_000


class BadImage(ValueError):
    """A file or payload that is not a decodable image; the message says why."""


def content_hash(data: bytes) -> str:
    """Hex sha256 of raw bytes: the identity of an image everywhere in NanoStream."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Verify and fully decode image bytes to RGB, EXIF orientation applied.

    draft_size lets JPEG decode at a reduced scale (much faster for large photos)
    when the caller only needs about that many pixels on the shorter side.
    Raises BadImage for anything that is not a complete, reasonably sized picture.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise BadImage(f"too many pixels ({width}x{height} > {max_pixels:,})")
            probe.verify()  # structural check; the image must be reopened after verify
        image = Image.open(io.BytesIO(data))
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # full decode: catches truncated data that verify() lets through
        # In place, and no conversion of what is RGB already: each copy is ~0.3 ms for a 500 px photo.
        ImageOps.exif_transpose(image, in_place=True)
        return image if image.mode == "RGB" else image.convert("RGB")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb refused: {exc}") from exc
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as exc:
        raise BadImage(f"not a readable image: {exc}") from exc


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Read and decode an image file; BadImage (never another error) for unreadable files."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror or exc}") from exc
    return decode_image(data, draft_size=draft_size)


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# Stored images are capped: backbones look at 224-520 px, and smaller files keep the store lean.
MAX_STORED_SIDE = 1024


def normalize_image(data: bytes, max_side: int = MAX_STORED_SIDE) -> bytes:
    """Untrusted image bytes -> clean JPEG bytes: RGB, EXIF orientation applied, metadata stripped,
    longest side capped. Raises BadImage. This is what the store keeps for every image."""
    image = decode_image(data)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)  # a fresh save carries no EXIF or other metadata
    return out.getvalue()
