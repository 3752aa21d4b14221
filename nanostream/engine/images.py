"""Decoding untrusted image files and bytes into RGB pictures, with limits."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# 50 MP is far more than any photo needs; larger files are decompression bombs or scans.
MAX_PIXELS = 50_000_000


class BadImage(ValueError):
    """A file or payload that is not a decodable image; the message says why."""


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
        raise BadImage(f"decompression bomb refused: {_plain(exc)}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        # PIL's own words name objects ("<_io.BytesIO ...>") or its internals ("Truncated File Read"):
        # a file that starts as a picture but does not decode is a damaged one, whatever PIL says.
        damaged = next((name for magic, name in _IMAGE_SIGNATURES if data.startswith(magic)), None)
        if damaged:
            raise BadImage(f"not a readable image: damaged {damaged} data") from exc
        if isinstance(exc, Image.UnidentifiedImageError):
            raise BadImage(f"not an image ({_what_it_is(data)})") from exc
        raise BadImage(f"not a readable image: {_plain(exc)}") from exc


# The first bytes of the formats PIL reads: a file that starts so but will not open is a damaged picture.
_IMAGE_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"),
                     (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
# What a file that is not an image usually is, by its first bytes: a web page saved as .jpg, ...
_SIGNATURES = ((b"%PDF-", "PDF"), (b"PK\x03\x04", "ZIP archive"), (b"\x1f\x8b", "gzip archive"))
# ISO media files by their brand: iPhones save HEIC photos, which Pillow does not read (AVIF it does).
_MEDIA = {b"heic": "HEIC photo: save it as JPEG", b"heix": "HEIC photo: save it as JPEG",
          b"isom": "MP4 video", b"mp42": "MP4 video", b"qt  ": "QuickTime video"}


def _what_it_is(data: bytes) -> str:
    """A short name for what bytes that PIL cannot open are: "HTML", "PDF", "text", ..."""
    head = data[:512]
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":  # ISO media: phones' HEIC photos, videos
        return _MEDIA.get(head[8:12], "ISO media file")
    if b"\x00" in head:  # text never holds a NUL byte
        return "unknown format"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # more than a character cut at the 512th byte
            return "unknown format"
        text = head[:exc.start].decode("utf-8")
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith("<!doctype html") or "<html" in start:
        return "HTML"
    if "<svg" in start:
        return "SVG drawing: save it as PNG"
    if start.startswith("<"):
        return "XML"
    if start.startswith(("{", "[")):
        return "JSON"
    return "text"


def _plain(exc: Exception) -> str:
    """PIL's message without object reprs ("<_io.BytesIO object at 0x...>"), on one short line."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return " ".join(text.split())[:200] or type(exc).__name__


def read_file(path: str | Path) -> bytes:
    """A file's bytes; BadImage saying why when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror or exc}") from exc


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Read and decode an image file; BadImage (never another error) for unreadable files."""
    return decode_image(read_file(path), draft_size=draft_size)


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


def thumbnail(path: str | Path, size: int) -> bytes:
    """A square JPEG thumbnail of a stored image, cropped to fill the square (for review grids)."""
    with Image.open(path) as image:
        image.draft("RGB", (size * 2, size * 2))  # a JPEG decodes at a fraction of its size: much faster
        square = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    square.save(out, format="JPEG", quality=85)
    return out.getvalue()
