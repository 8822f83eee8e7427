"""Unit tests of fundus_hemorrhage.preprocessing and .jpeg, without Triton."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image

from fundus_hemorrhage.preprocessing import Geometry, ImageError, PreprocessConfig, find_field_of_view, preprocess
from fundus_hemorrhage.preprocessing import decode, decode_reduction
from fundus_hemorrhage_perf.decode_bench import decodes_during_one_long_decode
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
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if idat is not None:
        out += _png_chunk(b"IDAT", zlib.compress(idat))
    return out + (_png_chunk(b"IEND", b"") if iend else b"")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


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


# ------------------------------------------------------------------------------------ JPEG scan damage
# Every JPEG row of docs/reliability.md at unit level: refused (4, 6, 7, 9 and the damage warnings) or processed with
# OpenCV's pixels (15, 16, 22 and the harmless warnings).

def _jpeg(width: int = 900, height: int = 700, params: list[int] | None = None) -> bytes:
    return encode(synthetic_fundus(width, height)[0], ".jpg", params)


def _pil_jpeg(mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(synthetic_fundus(900, 700)[0], cv2.COLOR_BGR2RGB)).convert(mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _scan_start(data: bytes) -> int:
    """Offset just past the first SOS header: where the entropy-coded data begins."""
    sos = data.find(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def _garbage_scan() -> bytes:
    """Row 6 (as tests/test_reliability.py builds it): a valid header, random scan data without 0xFF, the end marker."""
    data = _jpeg()
    scan = _scan_start(data)
    garbage = np.random.default_rng(0).integers(0, 256, len(data) - scan, dtype=np.uint8).tobytes()
    return data[:scan] + garbage.replace(b"\xff", b"\x00") + b"\xff\xd9"


def _bad_huffman_table() -> bytes:
    """The first Huffman table's symbols moved to 16-bit codes: the scan's codes are no longer valid."""
    data = bytearray(_jpeg())
    counts = slice(data.find(b"\xff\xc4") + 5, data.find(b"\xff\xc4") + 21)
    data[counts] = bytes(15) + bytes([sum(data[counts])])
    return bytes(data)


def _scan_cut_short() -> bytes:
    data = _jpeg()
    return data[:(_scan_start(data) + len(data)) // 2] + b"\xff\xd9"


def _progressive_cut() -> bytes:
    """A progressive JPEG cut 200 bytes into its second scan, the end marker put back."""
    data = _jpeg(params=[cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    second = data.find(b"\xff\xda", data.find(b"\xff\xda") + 2)
    return data[:second + 200] + b"\xff\xd9"


def _wrong_restart_marker() -> bytes:
    data = _jpeg(params=[cv2.IMWRITE_JPEG_RST_INTERVAL, 4])
    i = data.find(b"\xff\xd5", _scan_start(data))
    return data[:i] + b"\xff\xd6" + data[i + 2:]


def _stray_bytes_before(marker: bytes, count: int, fill: bytes = b"\x00") -> bytes:
    data = _jpeg()
    i = data.rfind(marker) if marker == b"\xff\xd9" else data.find(marker)
    return data[:i] + fill * count + data[i:]


def _with_thumbnail() -> bytes:
    """A photo whose APP1 segment carries a small JPEG (as an EXIF thumbnail does), end-of-image marker included."""
    thumbnail = encode(cv2.resize(synthetic_fundus(900, 700)[0], (160, 120)))
    app1 = b"Exif\x00\x00" + thumbnail
    data = _jpeg()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _mpo() -> bytes:
    """An MPO (as some cameras write): a JPEG followed by a second picture, announced in an APP2 MP index."""
    first, second = (Image.fromarray(cv2.cvtColor(synthetic_fundus(900, 700, seed=s)[0], cv2.COLOR_BGR2RGB))
                     for s in (0, 1))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    return buf.getvalue()


def _bomb() -> bytes:
    data = _jpeg()
    sof = data.find(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", 50000, 50000) + data[sof + 9:]


CORRUPT_JPEGS = {
    "garbage scan data (row 6)": (_garbage_scan, "corrupt JPEG data: 22748 extraneous bytes before marker 0xd9"),
    "bad Huffman code": (_bad_huffman_table, "corrupt JPEG data: bad Huffman code"),
    "scan cut short, end marker kept": (_scan_cut_short, "corrupt JPEG data: premature end of data segment"),
    "progressive, a later scan cut": (_progressive_cut, "corrupt JPEG data: premature end of data segment"),
    "wrong restart marker": (_wrong_restart_marker, "corrupt JPEG data: found marker 0xd6 instead of RST5"),
    "5000 stray bytes before the end marker": (lambda: _stray_bytes_before(b"\xff\xd9", 5000),
                                               "corrupt JPEG data: 4997 extraneous bytes before marker 0xd9"),
    "truncated (row 4)": (lambda: _jpeg()[:len(_jpeg()) // 2], "truncated JPEG: the end-of-image marker is missing"),
    "truncated, then 100 kB of zero padding": (lambda: _jpeg()[:len(_jpeg()) // 2] + bytes(100_000),
                                              "truncated JPEG: the end-of-image marker is missing"),
    "truncated, its EXIF thumbnail's end marker kept": (lambda: _with_thumbnail()[:len(_with_thumbnail()) // 2],
                                                        "truncated JPEG: the end-of-image marker is missing"),
    "header only (row 7)": (lambda: _jpeg()[:_scan_start(_jpeg())], "truncated JPEG"),
    "bomb 50000x50000 (row 9)": (_bomb, "image is 50000x50000 = 2500000000 pixels, over the limit of 60000000"),
}


@pytest.mark.parametrize("case", CORRUPT_JPEGS)
def test_corrupt_jpegs_are_refused_with_the_reason(case):
    make, reason = CORRUPT_JPEGS[case]
    with pytest.raises(ImageError, match=reason) as refused:
        preprocess(make())
    if reason.startswith("corrupt JPEG data"):
        assert str(refused.value).endswith("(the scan data is damaged)")


def _jfif_revision_3() -> bytes:
    data = bytearray(_jpeg())
    data[data.find(b"JFIF\x00") + 5] = 3  # "Warning: unknown JFIF revision number 3.01"
    return bytes(data)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _pil_jpeg(exif=exif)


# Readable JPEGs, each with exactly the pixels of the OpenCV decode the shipped model was trained on; the last four
# carry a harmless first libjpeg warning.
GOOD_JPEGS = {
    "baseline 4:2:0": _jpeg,
    "progressive": lambda: _jpeg(params=[cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    "restart interval": lambda: _jpeg(params=[cv2.IMWRITE_JPEG_RST_INTERVAL, 4]),
    "4:4:4": lambda: _pil_jpeg(subsampling=0, quality=90),
    "4:2:2": lambda: _pil_jpeg(subsampling=1, quality=90),
    "grayscale (row 11)": lambda: _pil_jpeg("L"),
    "CMYK (row 15)": lambda: _pil_jpeg("CMYK"),
    "EXIF-rotated (row 16)": _exif_rotated,
    "decoded at 1/2 (2600x2000)": lambda: _jpeg(2600, 2000),
    "bytes after the end marker (row 22)": lambda: _jpeg() + b"trailing bytes" * 100,
    "100 kB of zero padding after the end marker (row 22)": lambda: _jpeg() + bytes(100_000),
    "100 kB of 0xFF padding after the end marker (row 22)": lambda: _jpeg() + b"\xff" * 100_000,
    "an EXIF thumbnail with its own end marker": _with_thumbnail,
    "MPO: a second picture after the end marker": _mpo,
    "2 stray bytes before the end marker": lambda: _stray_bytes_before(b"\xff\xd9", 2),
    "10 stray bytes before the scan header": lambda: _stray_bytes_before(b"\xff\xda", 10, b"\x01"),
    "unknown JFIF revision": _jfif_revision_3,
    "bad ICC marker": lambda: _jpeg()[:2] + b"\xff\xe2\x00\x14ICC_PROFILE\x00\x05\x02abcd" + _jpeg()[2:],
}


def _opencv_decode(data: bytes) -> np.ndarray:
    """The decode of the former implementation (cv2.imdecode at the reduced scale), which the model was trained on."""
    width, height = Image.open(io.BytesIO(data)).size
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[decode_reduction(width, height, CONFIG.working_size)]
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)


@pytest.mark.parametrize("case", GOOD_JPEGS)
def test_readable_jpegs_decode_to_the_pixels_opencv_gave(case):
    data = GOOD_JPEGS[case]()
    bgr, scale, (_, width, _, _) = decode(data, CONFIG)
    assert np.array_equal(bgr, _opencv_decode(data))
    assert scale == width / bgr.shape[1]
    assert preprocess(data).geometry.width == width


@pytest.mark.parametrize("photo", SAMPLE_PHOTOS, ids=lambda p: p.name)
def test_sample_photos_decode_at_quarter_scale_to_the_pixels_opencv_gave(photo):
    data = photo.read_bytes()
    bgr, scale, _ = decode(data, CONFIG)
    assert bgr.shape == (712, 1072, 3) and scale == 4.0  # 4288x2848 through libjpeg's 1/4 DCT scaling
    assert np.array_equal(bgr, _opencv_decode(data))


def _decode_or_refusal(data: bytes) -> np.ndarray | ImageError:
    try:
        return decode(data, CONFIG)[0]
    except ImageError as exc:
        return exc


def _decode_concurrently(queues: list[list[bytes]], rounds: int = 4) -> list[list[np.ndarray | ImageError]]:
    """One thread per queue, released together, each decoding its queue `rounds` times over; results per queue."""
    start = threading.Barrier(len(queues))

    def work(queue: list[bytes]) -> list[np.ndarray | ImageError]:
        start.wait()
        return [_decode_or_refusal(data) for _ in range(rounds) for data in queue]

    with ThreadPoolExecutor(len(queues)) as pool:
        return list(pool.map(work, queues))


def _same(got: np.ndarray | ImageError, want: np.ndarray) -> bool:
    return isinstance(got, np.ndarray) and np.array_equal(got, want)


def test_two_threads_decoding_at_once_both_get_their_own_photo():
    photos = [p.read_bytes() for p in SAMPLE_PHOTOS[:2]]
    expected = [_opencv_decode(d) for d in photos]
    first, second = _decode_concurrently([[photos[0]], [photos[1]]])
    assert all(_same(got, expected[0]) for got in first)
    assert all(_same(got, expected[1]) for got in second)


def test_a_damaged_photo_decoded_alongside_good_ones_is_refused_and_the_good_ones_pass():
    good = [p.read_bytes() for p in SAMPLE_PHOTOS] + [_jpeg()]
    expected = [_opencv_decode(d) for d in good]
    damaged = [_bad_huffman_table(), _garbage_scan(), _scan_cut_short()]
    mixed = [damaged[0], good[0], damaged[1], good[3], damaged[2]]  # one thread: damaged and good in turn
    mixed_expected = [None, expected[0], None, expected[3], None]  # None: refused
    mixed_results, good_results = _decode_concurrently([mixed, good])  # the other: good photos only
    for i, got in enumerate(mixed_results):
        want = mixed_expected[i % len(mixed)]
        if want is None:
            assert isinstance(got, ImageError) and "corrupt JPEG data" in str(got)
        else:
            assert _same(got, want)
    assert all(_same(got, expected[i % len(good)]) for i, got in enumerate(good_results))


def test_a_long_jpeg_decode_does_not_hold_up_other_threads_decodes():
    long, short = SAMPLE_PHOTOS[0].read_bytes(), _jpeg()
    # Best of 3: a shared CPU may stall the other thread for a while, but a lock stalls it for the whole decode.
    results = [decodes_during_one_long_decode(long, short) for _ in range(3)]
    assert any(count >= 2 and longest_gap < 0.75 for count, longest_gap in results), results


# ------------------------------------------------------------------- orientation, trailing bytes, base64
# Row 16 for every format with an orientation tag: pixels as stored, the tag reported. OpenCV's TIFF decoder applies
# the tag in spite of IMREAD_IGNORE_ORIENTATION and Pillow reports a TIFF with orientation 5-8 at its displayed size.

def _fundus_rgb() -> np.ndarray:
    return cv2.cvtColor(synthetic_fundus(800, 600)[0], cv2.COLOR_BGR2RGB)


def _pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gray16(big_endian: bool = False) -> Image.Image:
    gray = cv2.cvtColor(_fundus_rgb(), cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    return Image.frombytes("I;16B" if big_endian else "I;16", (800, 600),
                           gray.astype(">u2" if big_endian else "<u2").tobytes())


TIFF_KINDS = {
    "RGB": lambda o: _pil_bytes(Image.fromarray(_fundus_rgb()), "TIFF", tiffinfo={274: o}),
    "LZW": lambda o: _pil_bytes(Image.fromarray(_fundus_rgb()), "TIFF", tiffinfo={274: o}, compression="tiff_lzw"),
    "deflate": lambda o: _pil_bytes(Image.fromarray(_fundus_rgb()), "TIFF", tiffinfo={274: o},
                                    compression="tiff_adobe_deflate"),
    "CMYK": lambda o: _pil_bytes(Image.fromarray(_fundus_rgb()).convert("CMYK"), "TIFF", tiffinfo={274: o}),
    "16-bit": lambda o: _pil_bytes(_gray16(), "TIFF", tiffinfo={274: o}),
    "16-bit big-endian (MM)": lambda o: _pil_bytes(_gray16(big_endian=True), "TIFF", tiffinfo={274: o}),
    "BigTIFF": lambda o: _pil_bytes(Image.fromarray(_fundus_rgb()), "TIFF", tiffinfo={274: o}, big_tiff=True),
}  # a multi-page TIFF is refused, naming its pages (tests/test_reliability_round3.py)


@pytest.mark.parametrize("kind", TIFF_KINDS)
def test_tiff_pixels_are_as_stored_and_the_orientation_is_reported(kind):
    stored, _, header = decode(TIFF_KINDS[kind](1), CONFIG)
    assert header == ("TIFF", 800, 600, 1) and stored.shape[:2] == (600, 800)
    for orientation in range(2, 9):
        bgr, _, header = decode(TIFF_KINDS[kind](orientation), CONFIG)
        assert header == ("TIFF", 800, 600, orientation), orientation
        assert np.array_equal(bgr, stored), orientation  # not flipped, rotated or transposed
    geometry = preprocess(TIFF_KINDS[kind](6)).geometry
    assert (geometry.width, geometry.height, geometry.exif_orientation) == (800, 600, 6)


def test_uncompressed_tiff_decodes_to_its_stored_pixels():
    bgr, _, _ = decode(TIFF_KINDS["RGB"](6), CONFIG)
    assert np.array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), _fundus_rgb())


def _png_with_exif(orientation: int, after_idat: bool = False) -> bytes:
    """A PNG with an eXIf chunk; Pillow writes it before IDAT, the PNG extensions also allow it after."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    if not after_idat:
        return _pil_bytes(Image.fromarray(_fundus_rgb()), "PNG", exif=exif)
    data = _pil_bytes(Image.fromarray(_fundus_rgb()), "PNG")
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + _png_chunk(b"eXIf", exif.tobytes().removeprefix(b"Exif\x00\x00")) + data[iend:]


@pytest.mark.parametrize("after_idat", [False, True], ids=["eXIf before IDAT", "eXIf after IDAT"])
def test_png_exif_orientation_is_reported_not_applied(after_idat):
    for orientation in range(1, 9):
        bgr, _, header = decode(_png_with_exif(orientation, after_idat), CONFIG)
        assert header == ("PNG", 800, 600, orientation), orientation
        assert np.array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), _fundus_rgb()), orientation


def test_a_png_with_a_damaged_exif_chunk_is_read_with_orientation_1():
    data = _pil_bytes(Image.fromarray(_fundus_rgb()), "PNG")
    iend = data.rindex(b"IEND") - 4
    _, _, header = decode(data[:iend] + _png_chunk(b"eXIf", b"MM\x00*garbage") + data[iend:], CONFIG)
    assert header == ("PNG", 800, 600, 1)


def test_bytes_after_a_png_iend_are_ignored_and_a_cut_png_is_refused_however_padded():
    data = encode(synthetic_fundus(900, 700)[0], ".png")
    for tail in (bytes(100_000), b"\xff" * 100_000, b"trailing bytes" * 10_000):
        bgr, _, header = decode(data + tail, CONFIG)
        assert header == ("PNG", 900, 700, 1) and np.array_equal(bgr, decode(data, CONFIG)[0])
    for tail in (b"", bytes(100_000)):
        with pytest.raises(ImageError, match="truncated PNG: the IEND chunk is missing"):
            preprocess(data[: len(data) // 2] + tail)


BASE64_PHOTOS = {
    "JPEG": lambda: base64.b64encode(_jpeg()),
    "JPEG, URL-safe alphabet": lambda: base64.urlsafe_b64encode(_jpeg()),
    "JPEG, MIME lines": lambda: base64.encodebytes(_jpeg()),
    "PNG": lambda: base64.b64encode(encode(synthetic_fundus(900, 700)[0], ".png")),
    "TIFF": lambda: base64.b64encode(encode(synthetic_fundus(900, 700)[0], ".tif")),
    "BMP": lambda: base64.b64encode(encode(synthetic_fundus(900, 700)[0], ".bmp")),
}


@pytest.mark.parametrize("case", BASE64_PHOTOS)
def test_base64_text_is_refused_saying_so(case):
    fmt = case.split(",")[0]
    with pytest.raises(ImageError, match=f"not an image file: the bytes are base64 text of a {fmt} file, not the "
                                         f"file itself .*taken as raw bytes.*binary tensor extension"):
        preprocess(BASE64_PHOTOS[case]())


def test_a_data_url_is_refused_saying_so():
    with pytest.raises(ImageError, match="not an image file: the bytes are a data: URL \\(base64 text\\) of a JPEG"):
        preprocess(b"data:image/jpeg;base64," + base64.b64encode(_jpeg()))


@pytest.mark.parametrize("text", [b"Qk is how this note starts, and it is not base64!", b"/9j/ not base64 either."])
def test_text_that_only_starts_like_base64_is_not_called_base64(text):
    with pytest.raises(ImageError, match="not an image file: the bytes match no known image format"):
        preprocess(text)
