"""JPEG decoding at a reduced scale that refuses damaged scan data and runs in many threads at once.

libjpeg does not fail on damaged entropy-coded (scan) data: it emits a warning ("Corrupt JPEG data: bad Huffman
code", ...), fills the damage with grey or noise and carries on. OpenCV drops these warnings after libjpeg has
printed them on file descriptor 2, so catching them there needs a process-wide lock around every decode.
TurboJPEG keeps the warning in the decoder's own handle instead: simplejpeg's `strict=True` decode (libjpeg-turbo
3.1.2 built into its wheel; the GIL is released while it decodes) stops at the first warning and raises it as a
ValueError, so each call learns about its own photo without any shared state.

The verdict is the one the OpenCV path gave: libjpeg prints only the first warning of a decode, so the first
warning decides. Pixels are those OpenCV decoded (IMREAD_REDUCED_COLOR_n, the same libjpeg-turbo IDCT scaling,
accurate DCT and fancy upsampling): max abs difference 0 on samples/*.jpg and the 54 IDRiD photos at 1/4 scale,
and on baseline, progressive, restart-interval, 4:4:4, 4:2:2, grayscale and CMYK test files
(tests/test_preprocess.py). A photo whose first warning is harmless, or that TurboJPEG cannot decode at all, is
decoded by OpenCV as before, so its pixels (or its refusal) do not change either. Measurements:
fundus_hemorrhage_perf/results/jpeg-decode.md.
"""

from __future__ import annotations

import re

import cv2
import numpy as np
import simplejpeg

# Warnings that mean the pixels are not the photo's (libjpeg-turbo's jerror.h texts, after "Corrupt JPEG data: ").
DAMAGE_WARNINGS = ("bad Huffman code", "bad arithmetic code", "premature end of data segment",
                   "Premature end of JPEG file", "instead of RST", "Invalid SOS parameters",
                   "Inconsistent progression sequence")
# A few stray bytes before a marker are common and harmless (some encoders pad); kilobytes of them mean the scan
# data is not what it claims to be.
MAX_HARMLESS_EXTRANEOUS_BYTES = 4096
_EXTRANEOUS = re.compile(r"(\d+) extraneous bytes before marker")
_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}


class CorruptScanData(ValueError):
    """The scan data is damaged; the message is libjpeg's warning, e.g. "bad Huffman code"."""


def decode_reduction(width: int, height: int, working_size: int) -> int:
    """Largest JPEG DCT scaling (1, 2, 4 or 8) that still leaves the short side >= the working size."""
    for factor in (8, 4, 2):
        if min(width, height) / factor >= working_size:
            return factor
    return 1


def damage_reason(message: str) -> str | None:
    """The damage a libjpeg warning reports ("bad Huffman code"), or None for a harmless or unknown message."""
    extraneous = _EXTRANEOUS.search(message)
    if any(w in message for w in DAMAGE_WARNINGS) or (
            extraneous and int(extraneous.group(1)) > MAX_HARMLESS_EXTRANEOUS_BYTES):
        return message.strip().removeprefix("Corrupt JPEG data: ").rstrip(".")
    return None


def reduced_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """(width, height) that libjpeg's 1/factor DCT scaling gives: each side rounded up."""
    return -(-width // factor), -(-height // factor)


def _opencv(data: bytes, factor: int) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION)


def decode_bgr(data: bytes, width: int, height: int, factor: int) -> np.ndarray | None:
    """BGR uint8 [ceil(height/factor), ceil(width/factor), 3] pixels of a JPEG, decoded at 1/factor scale.

    `width`, `height`: the photo's size from its header; `factor`: 1, 2, 4 or 8 (see decode_reduction).
    EXIF orientation is not applied. Returns None when the file cannot be decoded at all (as cv2.imdecode).
    Raises CorruptScanData when the first libjpeg warning reports damaged scan data. Thread-safe.
    """
    out_width, out_height = reduced_size(width, height, factor)
    try:
        bgr = simplejpeg.decode_jpeg(data, colorspace="BGR", min_height=out_height, min_width=out_width,
                                     strict=True)
    except ValueError as exc:
        reason = damage_reason(str(exc))
        if reason:
            raise CorruptScanData(reason) from None
        # A harmless first warning (a JFIF revision, an ICC marker, a few stray bytes), or an error TurboJPEG
        # gives up on (its header reader also fails on warnings): OpenCV decodes it, as before.
        return _opencv(data, factor)
    if bgr.shape[:2] != (out_height, out_width):  # defensive: simplejpeg picked another scaling factor
        return _opencv(data, factor)
    return bgr
