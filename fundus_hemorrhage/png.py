"""The mask and probability PNGs: 8-bit greyscale, encoded in time proportional to the non-zero rows.

Deflate is ISA-L's (python-isal, `isal_zlib`: the zlib API, ~2x faster than zlib at level 1 and, on masks, half
the size); the PNG framing (CRC-32) stays zlib's. Measured in fundus_hemorrhage_perf/results/stage-profile.md.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np
from isal import isal_zlib

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(gray: np.ndarray) -> bytes:
    """8-bit greyscale PNG (filter 'none', ISA-L deflate level 1), in time proportional to its non-zero rows.

    gray: uint8 [H, W]. A mask is almost all zeros. The zlib stream is built from independent, byte-aligned
    deflate segments (each ends with a full flush): runs of all-zero rows reuse one cached segment per 64 rows,
    and the Adler-32 of a zero run is updated arithmetically. A 12-megapixel mask costs a few ms instead of
    ~25 ms for zlib over all of it (and 50-130 ms for OpenCV's encoder).
    """
    h, w = gray.shape
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    row_bytes = w + 1  # filter byte + pixels
    nonzero = gray.any(axis=1)
    starts = np.flatnonzero(np.diff(nonzero, prepend=~nonzero[:1])).tolist()  # runs of rows alike
    parts, adler_a, adler_b = [], 1, 0
    for row, end in zip(starts, starts[1:] + [h]):
        n = end - row
        if nonzero[row]:
            raw = np.zeros((n, row_bytes), dtype=np.uint8)
            raw[:, 1:] = gray[row:end]
            adler = isal_zlib.adler32(raw, (adler_b << 16) | adler_a)
            adler_a, adler_b = adler & 0xFFFF, adler >> 16
            parts.append(_deflate_segment(raw))
        else:
            chunks, rest = divmod(n, _ZERO_CHUNK_ROWS)
            parts += [_zero_rows_segment(w, _ZERO_CHUNK_ROWS)] * chunks
            if rest:
                parts.append(_zero_rows_segment(w, rest))
            adler_b = (adler_b + n * row_bytes * adler_a) % 65521  # zeros leave the sum A unchanged
    idat = b"".join([b"\x78\x01", *parts, b"\x03\x00", struct.pack(">I", (adler_b << 16) | adler_a)])
    return b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)),
                     _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")])


_ZERO_CHUNK_ROWS = 64


def _deflate_segment(data) -> bytes:
    """Raw deflate blocks, not final, ending byte-aligned with no reference to earlier data (full flush)."""
    deflate = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15)
    return deflate.compress(data) + deflate.flush(isal_zlib.Z_FULL_FLUSH)


@functools.lru_cache(maxsize=256)
def _zero_rows_segment(width: int, rows: int) -> bytes:
    return _deflate_segment(bytes(rows * (width + 1)))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))
