import io

import numpy as np
import pytest
from PIL import Image

from nanostream.engine.images import BadImage, decode_image


def _jpeg(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, **save)
    return out.getvalue()


def _left_bright(width=40, height=20) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = 255  # left half white, right half black
    return Image.fromarray(pixels)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    decoded = decode_image(_jpeg(_left_bright(), exif=exif.tobytes()))
    assert decoded.size == (20, 40) and decoded.mode == "RGB"
    pixels = np.asarray(decoded).mean(axis=(1, 2))
    assert pixels[:15].mean() > 200 and pixels[-15:].mean() < 50  # the white half is now on top


def test_plain_rgb_and_greyscale_decode_to_rgb():
    assert np.asarray(decode_image(_jpeg(_left_bright()))).shape == (20, 40, 3)
    grey = io.BytesIO()
    _left_bright().convert("L").save(grey, format="PNG")
    decoded = decode_image(grey.getvalue())
    assert decoded.mode == "RGB" and decoded.size == (40, 20)


@pytest.mark.parametrize("payload,reason", [
    (b"", "empty"),
    (b"not an image at all", r"^not an image \(text\)$"),
    (_jpeg(_left_bright(400, 300))[:600], "not a readable image"),  # truncated
])
def test_bad_payloads_raise_bad_image(payload, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(payload)


def test_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(BadImage, match="too many pixels"):
        decode_image(_jpeg(_left_bright(400, 300)), max_pixels=100_000)
