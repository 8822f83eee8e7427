"""Fundus photograph preprocessing shared by serving (Triton `preprocess`) and training.

Pipeline: decode (at a reduced scale where the codec allows it) -> find the circular field of view (FOV)
-> image-quality gate (fundus_hemorrhage.quality): an ungradable photo stops here with zero pixels; a gradable one
has its exposure normalised (one gain on every pixel: the FOV's median luma to the training photos' typical level)
-> crop a square around the FOV (zero padding where the square leaves the photo) -> resize to the model's
working size -> CLAHE on the lightness channel -> zero outside the FOV.

Training (fundus_hemorrhage_training/data.py) calls `decode` + `preprocess_decoded` as `preprocess` does, so both get the exposure
normalisation. Models trained before it was added (unet v1, v2) saw un-normalised photos.

`Geometry` records how the working grid maps back onto the original photo, so that the postprocess
step can place the probability map at the photo's own resolution.
"""

from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from . import quality
from .contract import WORKING_SIZE
from .file_structure import ORIENTATION_TAG, jpeg_end, png_end, png_exif, tiff_as_stored
from .geometry import Geometry
from .jpeg import CorruptScanData, decode_bgr, decode_reduction

SUPPORTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")

# PIL refuses images over 2x this; our own pixel guard (PreprocessConfig.max_pixels) runs first anyway.
Image.MAX_IMAGE_PIXELS = None


# serve.py --max-request-bytes reaches the preprocess model as this environment variable.
MAX_REQUEST_BYTES_ENV = "HEMOSEG_MAX_REQUEST_BYTES"


def max_request_bytes(max_batch_size: int, max_bytes: int, environ=os.environ) -> int:
    """Bytes of images one request may carry: the environment's MAX_REQUEST_BYTES_ENV, else a full batch of
    photos at the per-photo limit (`max_batch_size` x `max_bytes`)."""
    return int(environ.get(MAX_REQUEST_BYTES_ENV) or max(1, max_batch_size) * max_bytes)


class ImageError(ValueError):
    """A photograph that cannot be processed; the message is the reason, shown to the client."""


@dataclass(frozen=True)
class PreprocessConfig:
    working_size: int = WORKING_SIZE
    max_bytes: int = 64 * 2**20  # one encoded photo
    max_pixels: int = 60_000_000  # decompression-bomb guard, checked from the header before decoding
    min_side: int = 128
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    # The FOV must cover at least this fraction of the photo, else it is not a usable fundus photo.
    min_fov_fraction: float = 0.05
    # Standard deviation of the (blurred, 8-bit) brightness inside the FOV below which the photo is blank.
    min_fov_texture: float = 1.0
    # The image-quality gate's limits and exposure policy (quality.py: every gradable photo normalised).
    quality_thresholds: quality.QualityThresholds = quality.SERVING_THRESHOLDS


@dataclass(frozen=True)
class Preprocessed:
    pixels: np.ndarray  # float32 [3, S, S], RGB in [0, 1]; all zero for an ungradable photo
    geometry: Geometry
    quality: quality.QualityAssessment  # the gate's verdict, and the exposure gain applied to the pixels


_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
               b"BM": "BMP"}


def sniff_format(data: bytes) -> str | None:
    return next((fmt for sig, fmt in _SIGNATURES.items() if data.startswith(sig)), None)


# The base64 text of each signature, as far as its characters depend on the signature alone ("/9j/" for JPEG,
# "iVBORw0KGg" for PNG, "SUkqA"/"TU0AK" for TIFF, "Qk" for BMP), in the standard and the URL-safe alphabet.
_BASE64_SIGNATURES = {encoded.translate(table): fmt for sig, fmt in _SIGNATURES.items()
                      for encoded in [base64.b64encode(sig)[: len(sig) * 8 // 6]]
                      for table in (None, bytes.maketrans(b"+/", b"-_"))}
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/\-_=\s]+")


def base64_image(data: bytes) -> str | None:
    """The format whose base64 text (or data: URL) the bytes are, e.g. "JPEG"; None when they are not."""
    head = data[:256].lstrip()
    if head[:5].lower() == b"data:":
        _, _, head = head.partition(b",")
    if not _BASE64_TEXT.fullmatch(head):
        return None
    return next((fmt for sig, fmt in _BASE64_SIGNATURES.items() if head.startswith(sig)), None)


def _unidentified(data: bytes) -> ImageError:
    fmt = sniff_format(data)
    if fmt:
        return ImageError(f"damaged {fmt} file: its header cannot be read")
    encoded = base64_image(data)
    if encoded:
        # The KServe v2 JSON protocol takes a BYTES element's string as the bytes themselves; base64 is not decoded.
        text = "a data: URL (base64 text)" if data.lstrip()[:5].lower() == b"data:" else "base64 text"
        return ImageError(f"not an image file: the bytes are {text} of a {encoded} file, not the file itself "
                          f"(a JSON request's \"data\" strings are taken as raw bytes: send the photo's bytes with "
                          f"the binary tensor extension, as a raw body, or over gRPC)")
    return ImageError("not an image file: the bytes match no known image format")


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as stored. Pillow reports a TIFF with orientation 5-8 at its displayed size."""
    if im.format == "TIFF":
        return int(im.tag_v2[256]), int(im.tag_v2[257])  # ImageWidth, ImageLength of the first image
    return im.size


def _png_orientation(payload: bytes | None) -> object:
    exif = Image.Exif()
    try:
        exif.load(payload or b"")
    except Exception:  # a damaged eXIf chunk: its orientation is ignored, as an invalid value is
        return 1
    return exif.get(ORIENTATION_TAG, 1)


def _orientation(im: Image.Image, data: bytes) -> int:
    """The EXIF orientation tag, 1..8; 1 when absent or invalid (not a valid EXIF orientation: ignored)."""
    if im.format in ("JPEG", "MPO", "TIFF"):  # APP1 EXIF / IFD0: read by Pillow without decoding pixels
        value = im.getexif().get(ORIENTATION_TAG, 1)
    elif im.format == "PNG":  # Pillow's PngImageFile.getexif() would decode the whole image to look for eXIf
        value = _png_orientation(png_exif(data))
    else:
        value = 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def read_header(data: bytes, config: PreprocessConfig) -> tuple[str, int, int, int]:
    """Format, width and height as stored, and EXIF orientation, from the header only (no pixel decoding).

    An MPO (a JPEG followed by further pictures, as some cameras write) is read as the JPEG it starts with.
    """
    return read_header_and_jpeg_quality(data, config)[0]


MAX_COUNTED_FRAMES = 100  # a TIFF's pages are counted up to this (each is a directory to read; 20,000: 5 s)


def _frame_count(im: Image.Image) -> str:
    """How many frames (APNG: the acTL count) or pages (TIFF: image directories) the file has, as text: "1", "2", ...
    or "more than MAX_COUNTED_FRAMES". An MPO's further pictures are not counted (its first is the primary image)."""
    if not getattr(im, "is_animated", False):
        return "1"
    if im.format == "PNG":
        return str(im.n_frames)
    for page in range(1, MAX_COUNTED_FRAMES + 1):
        try:
            im.seek(page)
        except EOFError:
            return str(page)
    return f"more than {MAX_COUNTED_FRAMES}"


def _jpeg_quality(im: Image.Image) -> float | None:
    """libjpeg quality (1-100) estimated from the luminance quantisation table (quality.jpeg_quality); None when
    the file has none (not a JPEG)."""
    tables = getattr(im, "quantization", None)
    return quality.jpeg_quality(tables[0]) if tables and 0 in tables else None


def read_header_and_jpeg_quality(data: bytes, config: PreprocessConfig) -> tuple[tuple[str, int, int, int],
                                                                                    float | None]:
    """`read_header`'s (format, width, height, orientation), and the JPEG quality estimated from the file's
    quantisation table (None for other formats): the gate's "heavily compressed" check. Raises ImageError."""
    if len(data) == 0:
        raise ImageError("empty input: no image bytes")
    if len(data) > config.max_bytes:
        raise ImageError(f"file is {len(data)} bytes, over the limit of {config.max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = "JPEG" if im.format == "MPO" else im.format
            (width, height), orientation = _stored_size(im), _orientation(im, data)
            jpeg_quality = _jpeg_quality(im) if fmt == "JPEG" else None
            frames = _frame_count(im) if fmt in ("PNG", "TIFF") else "1"
    except Image.UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as exc:  # PIL raises many types for damaged headers; all mean the same to the client
        if isinstance(exc, ValueError) and "MAX_TEXT" in str(exc):  # Pillow's bound on inflated PNG text/ICC chunks
            raise ImageError(f"PNG metadata too large: a compressed text or ICC-profile chunk (zTXt, iTXt or iCCP) "
                             f"inflates past {PngImagePlugin.MAX_TEXT_CHUNK} bytes, or all text past "
                             f"{PngImagePlugin.MAX_TEXT_MEMORY} bytes; not read (decompression-bomb guard): "
                             f"resend the photo without that metadata") from None
        raise ImageError(f"damaged image header ({exc})") from None
    if frames != "1":
        what = "pages" if fmt == "TIFF" else "frames (an animated PNG)"
        raise ImageError(f"{fmt} file with {frames} {what}: only single-image files are accepted, because which "
                         f"one is the photo cannot be told (the first may be a thumbnail, a cover page or a blank "
                         f"frame); send each photo as a file of its own")
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(f"unsupported image format {fmt}; accepted: {', '.join(SUPPORTED_FORMATS)}")
    if width * height > config.max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {config.max_pixels}")
    if min(width, height) < config.min_side:
        raise ImageError(f"image is {width}x{height}, too small (the shorter side must be at least {config.min_side} px)")
    return (fmt, width, height, orientation), jpeg_quality


def _check_complete(data: bytes, fmt: str) -> None:
    # Decoders fill a truncated file with grey and carry on; a half photo must not be graded. The end is found by
    # the file's structure, so bytes after it (padding, an appended video or picture) do not matter.
    if fmt == "JPEG" and jpeg_end(data) is None:
        raise ImageError("truncated JPEG: the end-of-image marker is missing")
    if fmt == "PNG" and png_end(data) is None:
        raise ImageError("truncated PNG: the IEND chunk is missing")


def decode(data: bytes, config: PreprocessConfig) -> tuple[np.ndarray, float, tuple[str, int, int, int]]:
    """BGR uint8 pixels (possibly reduced), the reduction factor actually applied, and the header.

    Pixels follow the stored orientation: EXIF rotation is reported, not applied, so that the mask
    lines up with the stored pixels (and with every viewer that ignores EXIF, as medical ones do).
    """
    return decode_with_jpeg_quality(data, config)[:3]


def decode_with_jpeg_quality(data: bytes, config: PreprocessConfig) -> tuple[
        np.ndarray, float, tuple[str, int, int, int], float | None]:
    """`decode`'s (pixels, reduction, header), and the JPEG quality of `read_header_and_jpeg_quality`."""
    header, jpeg_quality = read_header_and_jpeg_quality(data, config)
    fmt, width, height, _ = header
    _check_complete(data, fmt)
    if fmt == "JPEG":  # decoded at a reduced scale by the IDCT itself (libjpeg DCT scaling): 1/4 for IDRiD
        try:
            bgr = decode_bgr(data, width, height, decode_reduction(width, height, config.working_size))
        except CorruptScanData as exc:  # libjpeg would fill the damage with grey and carry on
            raise ImageError(f"corrupt JPEG data: {exc} (the scan data is damaged)") from None
    else:  # OpenCV's TIFF decoder applies the orientation tag in spite of IMREAD_IGNORE_ORIENTATION
        stored = tiff_as_stored(data) if fmt == "TIFF" else data
        bgr = cv2.imdecode(np.frombuffer(stored, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ImageError(f"corrupt {fmt} data: the decoder could not read the pixels")
    if bgr.dtype != np.uint8:  # defensive: IMREAD_COLOR always yields 8-bit today
        bgr = cv2.convertScaleAbs(bgr, alpha=255.0 / max(1.0, float(bgr.max())))
    return bgr, width / bgr.shape[1], header, jpeg_quality


@dataclass(frozen=True)
class FieldOfView:
    cx: float
    cy: float
    radius: float
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int
    area: int  # pixels


def _fov_step(shape: tuple[int, ...]) -> int:
    """Subsampling of the FOV search: the FOV is large and smooth, so it is found on every max(H, W) // 512-th pixel."""
    return max(1, int(max(shape[:2]) // 512))


def fov_brightness(bgr: np.ndarray) -> np.ndarray:
    """uint8 [ceil(H/step), ceil(W/step)]: the channel maximum of every `_fov_step`-th pixel. A per-pixel gain
    commutes with it, so the FOV of a photo with its exposure changed is found on this map with the gain applied
    (quality.apply_exposure_gain)."""
    step = _fov_step(bgr.shape)
    small = bgr[::step, ::step]
    # np.maximum on the three planes, ~6x faster than a max over the 3-long last axis.
    return np.maximum(np.maximum(small[..., 0], small[..., 1]), small[..., 2])


def find_field_of_view(bgr: np.ndarray, min_fraction: float = 0.05, min_texture: float = 1.0,
                       brightness: np.ndarray | None = None) -> FieldOfView:
    """The illuminated disc of a fundus photo [H, W, 3] uint8: the largest bright component of a thresholded
    brightness (`fov_brightness(bgr)`, computed here unless given).

    A photo without a dark border (a cropped fundus photo, or any bright picture) gets the whole frame: the
    disc of half its longer side, clipped to the frame. A region without texture is refused (blank frame).
    """
    h, w = bgr.shape[:2]
    step = _fov_step(bgr.shape)
    brightness = cv2.GaussianBlur(fov_brightness(bgr) if brightness is None else brightness, (5, 5), 0)
    threshold = max(12.0, 0.12 * float(np.percentile(brightness, 99)))
    fov = (brightness > threshold).astype(np.uint8)
    fov = cv2.morphologyEx(fov, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fov, connectivity=8)
    if count < 2:
        raise ImageError("no retinal field of view found: the photo is dark everywhere")
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh, area = (int(v) for v in stats[best])
    if area < min_fraction * fov.size:
        raise ImageError(f"no retinal field of view found: the largest bright region covers "
                         f"{area / fov.size:.1%} of the photo (at least {min_fraction:.0%} needed)")
    if float(brightness[labels == best].std()) < min_texture:
        raise ImageError("no usable image content: the photo is a uniform area (blank, or over- or under-exposed)")
    x0, y0 = x * step, y * step
    x1, y1 = min(w, (x + bw) * step), min(h, (y + bh) * step)
    # Fundus cameras clip the disc at the top and bottom, never the sides' width: radius from the wider span.
    radius = max(x1 - x0, y1 - y0) / 2.0
    return FieldOfView((x0 + x1) / 2.0, (y0 + y1) / 2.0, radius, x0, y0, x1, y1, area * step * step)


def fov_mask(shape: tuple[int, int], cx: float, cy: float, radius: float,
             box: tuple[float, float, float, float]) -> np.ndarray:
    """uint8 {0,1} mask of the FOV disc clipped to its bounding box, on a grid of the given (h, w)."""
    h, w = shape
    ys, xs = np.ogrid[:h, :w]
    x0, y0, x1, y1 = box
    inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    inside &= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return inside.astype(np.uint8)


def _clahe(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=config.clahe_clip_limit,
                            tileGridSize=(config.clahe_tile_grid, config.clahe_tile_grid))
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def geometry_for(fov: FieldOfView, scale: float, width: int, height: int, orientation: int = 1) -> Geometry:
    """Geometry in original pixels from a FOV found on an image decoded at 1/scale."""
    side = 2.0 * fov.radius * scale
    cx, cy = fov.cx * scale, fov.cy * scale
    return Geometry(width, height, cx - side / 2.0, cy - side / 2.0, side, cx, cy, fov.radius * scale,
                    fov.x0 * scale, fov.y0 * scale, min(width, fov.x1 * scale), min(height, fov.y1 * scale),
                    fov.area * scale * scale, orientation)


def to_working(image: np.ndarray, geometry: Geometry, working_size: int, scale: float = 1.0,
               interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Resample an image (or mask) given on the original grid reduced by `scale` onto the working grid."""
    a = geometry.original_to_working(working_size)
    # Coordinates on a reduced grid: original x = (xr + 0.5) * scale - 0.5.
    m = np.hstack([a[:, :2] * scale, a[:, 2:] + (0.5 * scale - 0.5) * a[:, :2].sum(axis=1, keepdims=True)])
    if interpolation == cv2.INTER_AREA:
        # warpAffine has no area filter: pre-shrink with INTER_AREA to the working scale, then warp.
        shrink = geometry.square_side / (working_size * scale)
        if shrink > 1.5:
            h, w = image.shape[:2]
            small = cv2.resize(image, (max(1, round(w / shrink)), max(1, round(h / shrink))),
                               interpolation=cv2.INTER_AREA)
            sx, sy = w / small.shape[1], h / small.shape[0]
            pre = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
            m = (np.vstack([m, [0, 0, 1]]) @ pre)[:2]
            image = small
        interpolation = cv2.INTER_LINEAR
    return cv2.warpAffine(image, m, (working_size, working_size), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def working_fov_mask(geometry: Geometry, working_size: int) -> np.ndarray:
    m = geometry.original_to_working(working_size)
    s = m[0, 0]
    cx, cy = m @ [geometry.fov_cx, geometry.fov_cy, 1.0]
    (x0, y0), (x1, y1) = m @ [geometry.fov_x0, geometry.fov_y0, 1.0], m @ [geometry.fov_x1, geometry.fov_y1, 1.0]
    return fov_mask((working_size, working_size), cx, cy, geometry.fov_radius * s, (x0, y0, x1, y1))


def preprocess_decoded(bgr: np.ndarray, scale: float, width: int, height: int, config: PreprocessConfig,
                       orientation: int = 1, jpeg_quality: float | None = None) -> Preprocessed:
    """Decoded BGR uint8 pixels (reduced by `scale`) of a photo stored width x height -> model input, geometry and
    the image-quality verdict (`config.quality_thresholds`; `jpeg_quality` from `read_header_and_jpeg_quality`,
    None: not checked). Raises ImageError when there is no field of view.

    Gradable: the exposure gain is applied and the FOV found again on the normalised pixels (what the model sees),
    then crop, resize, CLAHE. Ungradable: the geometry of the FOV as decoded and all-zero pixels (nothing is
    resampled: the photo is not segmented). Training calls this too, so both get the same normalisation.
    """
    brightness = fov_brightness(bgr)
    fov = find_field_of_view(bgr, config.min_fov_fraction, config.min_fov_texture, brightness)
    verdict = quality.assess(bgr, fov, jpeg_quality, config.quality_thresholds)
    s = config.working_size
    if not verdict.gradable:
        return Preprocessed(np.zeros((3, s, s), np.float32), geometry_for(fov, scale, width, height, orientation),
                            verdict)
    if verdict.exposure_normalised:
        bgr = quality.apply_exposure_gain(bgr, verdict.exposure_gain)
        fov = find_field_of_view(bgr, config.min_fov_fraction, config.min_fov_texture,
                                 quality.apply_exposure_gain(brightness, verdict.exposure_gain))
    geometry = geometry_for(fov, scale, width, height, orientation)
    # Warp, then swap the channels: the same pixels as swapping first, on 0.4 instead of 0.8 megapixels.
    rgb = cv2.cvtColor(to_working(bgr, geometry, s, scale), cv2.COLOR_BGR2RGB)
    rgb = _clahe(rgb, config)
    rgb = cv2.bitwise_and(rgb, rgb, mask=working_fov_mask(geometry, s))  # 0 outside the FOV
    pixels = np.multiply(rgb.transpose(2, 0, 1), np.float32(1.0 / 255.0), dtype=np.float32)
    return Preprocessed(pixels, geometry, verdict)


def preprocess(data: bytes, config: PreprocessConfig = PreprocessConfig()) -> Preprocessed:
    """Encoded photo bytes -> model input, geometry and image-quality verdict. Raises ImageError with the reason
    (an ungradable photo is not an error: see `Preprocessed.quality`)."""
    bgr, scale, (_, width, height, orientation), jpeg_quality = decode_with_jpeg_quality(data, config)
    return preprocess_decoded(bgr, scale, width, height, config, orientation, jpeg_quality)
