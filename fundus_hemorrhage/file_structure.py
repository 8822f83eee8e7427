"""Where an image file's parts are, read from its structure rather than guessed from its last bytes.

* JPEG: the end-of-image (EOI) marker that ends the photo, found by walking the marker segments (ISO/IEC 10918-1,
  annex B) and the entropy-coded data between them. A photo may be followed by anything: scanner or PACS padding
  (zeros, 0xFF), a Google Motion Photo's MP4, an MPO's further pictures. libjpeg stops at the EOI and ignores the
  rest, so a file is complete exactly when its EOI is there.
* PNG: the chunks (PNG specification, section 5.3) up to IEND, which ends the file; bytes after IEND are ignored
  by libpng. The eXIf chunk (PNG 1.5 extensions / PNG third edition) carries an EXIF block, orientation included.
* TIFF: the orientation tag (274) of the first image file directory (IFD0), which OpenCV's TIFF decoder applies
  even with IMREAD_IGNORE_ORIENTATION (measured: OpenCV 4.11), and where Pillow reports the displayed size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

ORIENTATION_TAG = 0x0112  # EXIF/TIFF Orientation, 1..8 (1: stored rows top to bottom, columns left to right)

# Markers without a length field: TEM, SOI, RST0-7 (RST markers are left out of the search below: they only
# occur inside entropy-coded data, where they are part of the scan).
_STANDALONE = (0x01, 0xD8)
_EOI = 0xD9


def _jpeg_markers(data: bytes) -> np.ndarray:
    """Offsets of every 0xFF that starts a marker: followed by a byte that is not 0x00 (a stuffed 0xFF in
    entropy-coded data), not 0xFF (fill before a marker) and not RST0-7."""
    a = np.frombuffer(data, np.uint8)
    ff = np.flatnonzero(a[:-1] == 0xFF)
    follower = a[ff + 1]
    return ff[(follower != 0x00) & (follower != 0xFF) & ((follower < 0xD0) | (follower > 0xD7))]


def jpeg_end(data: bytes) -> int | None:
    """Offset just after the EOI marker that ends the JPEG starting at data[0] (after SOI), or None when the file
    ends before it (truncated).

    Segments with a length field (APPn with an EXIF thumbnail that has its own EOI, DQT, DHT, SOFn, SOS...) are
    skipped by their length; stray bytes between segments are skipped as libjpeg skips them ("extraneous bytes
    before marker"). A 0xFF 0xD9 pair cannot occur inside entropy-coded data (every 0xFF there is followed by
    0x00 or RSTn), so the first EOI outside a segment is the photo's end. Costs ~1 ms per MB (numpy scan).
    """
    markers = _jpeg_markers(data)
    pos = 2
    while True:
        i = int(np.searchsorted(markers, pos))
        if i == len(markers):
            return None
        at = int(markers[i])
        marker = data[at + 1]
        if marker == _EOI:
            return at + 2
        if marker in _STANDALONE:
            pos = at + 2
            continue
        if at + 4 > len(data):
            return None
        pos = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")


def png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(chunk type, payload start, payload end) of each complete chunk after the signature, up to and including
    IEND. Stops early where the data ends inside a chunk or where the bytes are not a chunk (a type that is not
    four ASCII letters, e.g. zero padding after a cut)."""
    pos = 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        start, end = pos + 8, pos + 8 + length
        if not kind.isalpha() or end + 4 > len(data):
            return
        yield kind, start, end
        if kind == b"IEND":
            return
        pos = end + 4


def png_end(data: bytes) -> int | None:
    """Offset just after the IEND chunk, or None when the file ends before it (truncated)."""
    return next((end + 4 for kind, _, end in png_chunks(data) if kind == b"IEND"), None)


def png_exif(data: bytes) -> bytes | None:
    """The payload of the PNG's eXIf chunk (a TIFF-structured EXIF block), before or after IDAT; None if none."""
    return next((data[start:end] for kind, start, end in png_chunks(data) if kind == b"eXIf"), None)


def _tiff_orientation_entry(data: bytes) -> tuple[int, str, int] | None:
    """(offset of the value, struct byte order, value size) of IFD0's orientation tag; None if there is none or
    the directory cannot be read. Classic TIFF (42) and BigTIFF (43)."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None:
        return None
    try:
        magic = struct.unpack_from(order + "H", data, 2)[0]
        if magic == 42:  # classic TIFF: 2-byte entry count, 12-byte entries, value at +8
            ifd = struct.unpack_from(order + "I", data, 4)[0]
            count, first = struct.unpack_from(order + "H", data, ifd)[0], ifd + 2
            size, count_fmt, value_at = 12, "I", 8
        elif magic == 43:  # BigTIFF: 8-byte entry count, 20-byte entries, value at +12
            ifd = struct.unpack_from(order + "Q", data, 8)[0]
            count, first = struct.unpack_from(order + "Q", data, ifd)[0], ifd + 8
            size, count_fmt, value_at = 20, "Q", 12
        else:
            return None
        for entry in range(first, min(len(data) - size + 1, first + count * size), size):
            tag, kind = struct.unpack_from(order + "HH", data, entry)
            n = struct.unpack_from(order + count_fmt, data, entry + 4)[0]
            if tag == ORIENTATION_TAG and n == 1 and kind in (3, 4):  # SHORT (the standard's type) or LONG
                return entry + value_at, order, 2 if kind == 3 else 4
    except struct.error:
        return None
    return None


def tiff_as_stored(data: bytes) -> bytes:
    """The TIFF with IFD0's orientation tag set to 1, so that a decoder returns the pixels in stored order;
    the same bytes when there is no such tag or it is already 1. Nothing else changes (the tag's value is
    stored inside its directory entry)."""
    entry = _tiff_orientation_entry(data)
    if entry is None:
        return data
    at, order, size = entry
    one = struct.pack(order + ("H" if size == 2 else "I"), 1)
    if data[at:at + size] == one:
        return data
    return data[:at] + one + data[at + size:]
