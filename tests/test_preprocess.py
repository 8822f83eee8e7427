"""Unit tests of preprocess_backend, without Triton."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from fundus_hemorrhage.preprocessing import Geometry, ImageError, PreprocessConfig, find_field_of_view, preprocess
from fundus_hemorrhage.preprocessing import decode_reduction
from tests.conftest import SAMPLE_PHOTOS
from tests.fundus import encode, synthetic_fundus

CONFIG = PreprocessConfig()


def test_sample_photo_is_preprocessed_to_the_working_grid():
    data = SAMPLE_PHOTOS[0].read_bytes()
    result = preprocess(data)
    s = CONFIG.working_size
    assert result.pixels.shape == (3, s, s) and result.pixels.dtype == np.float32
    assert 0.0 <= result.pixels.min() and result.pixels.max() <= 1.0
    g = result.geometry
    assert (g.width, g.height) == (4288, 2848)
    # IDRiD: the disc spans the full height and is clipped at top and bottom; its diameter is ~3400-3900 px.
    assert 3200 < 2 * g.fov_radius < 4100
    assert g.fov_y0 <= 5 and g.fov_y1 >= 2843
    # Corners of the working grid are outside the FOV: exactly zero.
    assert result.pixels[:, :5, :5].max() == 0.0


def test_field_of_view_found_on_synthetic_disc():
    img, _ = synthetic_fundus(1000, 800, radius=350, center=(480, 410))
    fov = find_field_of_view(img)
    assert abs(fov.cx - 480) < 8 and abs(fov.cy - 410) < 8
    assert abs(fov.radius - 350) < 10


@pytest.mark.parametrize("ext", [".jpg", ".png", ".tif", ".bmp"])
def test_formats_give_the_same_geometry(ext):
    img, _ = synthetic_fundus(900, 700)
    g = preprocess(encode(img, ext)).geometry
    assert (g.width, g.height) == (900, 700)
    assert abs(g.fov_cx - 450) < 6 and abs(g.fov_cy - 350) < 6


def test_unusual_encodings_are_read():
    img, _ = synthetic_fundus(800, 600)
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    variants = {}
    variants["gray"] = encode(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), ".png")
    variants["16-bit"] = encode(img.astype(np.uint16) * 257, ".png")
    variants["alpha"] = encode(cv2.cvtColor(img, cv2.COLOR_BGR2BGRA), ".png")
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(buf, "PNG")
    variants["palette"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    variants["cmyk"] = buf.getvalue()
    for name, data in variants.items():
        g = preprocess(data).geometry
        assert (g.width, g.height) == (800, 600), name
        assert abs(g.fov_cx - 400) < 8, name


def test_exif_orientation_is_reported_not_applied():
    img, _ = synthetic_fundus(800, 600)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW for display
    Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)).save(buf, "JPEG", exif=exif)
    g = preprocess(buf.getvalue()).geometry
    assert (g.width, g.height) == (800, 600)  # stored pixels, not the displayed 600x800
    assert g.exif_orientation == 6


def _png(width: int, height: int, idat: bytes | None = b"", iend: bool = True) -> bytes:
    """A PNG whose header claims width x height; the pixel data may be missing or short."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if idat is not None:
        out += chunk(b"IDAT", zlib.compress(idat))
    return out + (chunk(b"IEND", b"") if iend else b"")


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image file"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "damaged JPEG"),  # only the start of a header
    (_png(100_000, 100_000), "over the limit"),  # a decompression bomb: refused from the header
    (_png(800, 600, idat=None, iend=False), "damaged PNG"),  # only a header
    (_png(800, 600, idat=b"\x00" * 100, iend=False), "truncated PNG"),
    (_png(800, 600, idat=b"\x00" * 100), "corrupt PNG"),  # complete file, pixel data far too short
])
def test_bad_inputs_name_the_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        preprocess(data)


def test_truncated_jpeg_is_refused():
    data = SAMPLE_PHOTOS[0].read_bytes()
    with pytest.raises(ImageError, match="truncated JPEG"):
        preprocess(data[: len(data) // 2])


def test_byte_and_size_limits():
    img, _ = synthetic_fundus(900, 700)
    data = encode(img, ".png")
    with pytest.raises(ImageError, match="bytes, over the limit"):
        preprocess(data, PreprocessConfig(max_bytes=len(data) - 1))
    with pytest.raises(ImageError, match="too small"):
        preprocess(encode(cv2.resize(img, (60, 50)), ".png"))


def test_dark_or_non_fundus_photo_has_no_field_of_view():
    with pytest.raises(ImageError, match="no retinal field of view"):
        preprocess(encode(np.zeros((600, 800, 3), np.uint8), ".png"))
    speck = np.zeros((600, 800, 3), np.uint8)
    cv2.circle(speck, (100, 100), 20, (200, 200, 200), -1)
    with pytest.raises(ImageError, match="no retinal field of view"):
        preprocess(encode(speck, ".png"))


def test_geometry_vector_round_trip():
    g = preprocess(SAMPLE_PHOTOS[1].read_bytes()).geometry
    assert Geometry.from_vector(g.to_vector()) == g


def test_jpeg_decode_reduction_keeps_at_least_the_working_size():
    assert decode_reduction(4288, 2848, 640) == 4
    assert decode_reduction(999, 960, 640) == 1
    assert decode_reduction(8000, 6000, 640) == 8
