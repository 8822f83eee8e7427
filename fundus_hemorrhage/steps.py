"""The service's per-photo steps, written once: the Triton adapters (model_repository/preprocess and postprocess)
do tensor I/O around them, and `pipeline.Pipeline` runs them in one process.

    read_photos    IMAGE bytes [N] -> ReadBatch: PIXELS [N, 3, S, S] float32, GEOMETRY [N, GEOMETRY_LENGTH]
                   float64, ERROR [N] (reason, "" if readable), ANATOMY [N, ANATOMY_LENGTH] float32, QUALITY [N]
    answer_photos  PROBABILITY, THRESHOLD, MODEL_VERSION + those rows -> a PhotoResult per photo

Errors are data. A photo that cannot be read gets zero PIXELS and its reason (one line, no image index: the
report carries `image_index`) in ERROR, and is answered with `report.error_report`; its neighbours are processed
as usual, and a request in which no photo can be read is answered photo by photo like any other. Nothing here
raises for a photo: a decoder bug or an exotic file becomes that photo's error, logged with its index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from . import contract as c
from .anatomy import AnatomyDetector, anatomy_rows
from .anatomy_tensor import Anatomy
from .geometry import Geometry
from .postprocessing import PostprocessConfig, postprocess
from .preprocessing import ImageError, Preprocessed, PreprocessConfig, preprocess
from .quality import QualityAssessment
from .report import PhotoResult, error_report

Log = Callable[[str], None]
_log = logging.getLogger(__name__).error


def read_photo(data, config: PreprocessConfig, index: int = 0, log: Log = _log) -> Preprocessed | str:
    """One photo's bytes -> its preprocessed model input, or the reason it cannot be read. Never raises."""
    try:
        if not isinstance(data, bytes):
            raise ImageError(f"expected image bytes, got {type(data).__name__}")
        return preprocess(data, config)
    except ImageError as exc:
        return str(exc)
    except Exception as exc:  # a bug or an exotic file must not take the neighbours down
        log(f"preprocess: unexpected failure on image {index}: {exc!r}")
        return f"could not be processed ({type(exc).__name__})"


def detect_anatomy(detector: AnatomyDetector | None, photos: Sequence[Preprocessed | str], log: Log = _log) -> np.ndarray:
    """ANATOMY float32 [N, ANATOMY_LENGTH]: one detector call on the readable, gradable photos. A detector failure
    leaves the landmarks unknown ("detector not available"); it never fails the photos."""
    pixels = [p.pixels if isinstance(p, Preprocessed) and p.quality.gradable else None for p in photos]
    try:
        return anatomy_rows(detector, pixels)
    except Exception as exc:
        log(f"preprocess: optic disc and fovea detector failed: {exc!r}")
        return anatomy_rows(None, pixels)


@dataclass
class ReadBatch:
    """What preprocess hands on, one row per photo (the ensemble's tensors of the same names)."""
    photos: list[Preprocessed | str]
    pixels: np.ndarray  # PIXELS [N, 3, S, S] float32, zeros for an unreadable photo
    geometry: np.ndarray  # GEOMETRY [N, GEOMETRY_LENGTH] float64
    errors: list[str]  # ERROR: the reason a photo cannot be read, "" if it can
    anatomy: np.ndarray  # ANATOMY [N, ANATOMY_LENGTH] float32
    quality: list[bytes]  # QUALITY: the gate's verdict (QualityAssessment JSON), b"" for an unreadable photo


def read_photos(images: Sequence, config: PreprocessConfig, pool: Executor, detector: AnatomyDetector | None,
                log: Log = _log) -> ReadBatch:
    """A request's photos, decoded and preprocessed `pool`-parallel (OpenCV and the decoders release the GIL)."""
    photos = list(pool.map(lambda i: read_photo(images[i], config, i, log), range(len(images))))
    s = config.working_size
    zeros, no_geometry = np.zeros((3, s, s), np.float32), np.zeros(c.GEOMETRY_LENGTH)
    readable = [isinstance(p, Preprocessed) for p in photos]
    return ReadBatch(
        photos,
        np.stack([p.pixels if ok else zeros for p, ok in zip(photos, readable)]) if photos
        else np.zeros((0, 3, s, s), np.float32),
        np.stack([p.geometry.to_vector() if ok else no_geometry for p, ok in zip(photos, readable)]) if photos
        else np.zeros((0, c.GEOMETRY_LENGTH)),
        ["" if ok else p for p, ok in zip(photos, readable)],
        detect_anatomy(detector, photos, log),
        [p.quality.to_json() if ok else b"" for p, ok in zip(photos, readable)])


def answer_photo(index: int, probability: np.ndarray, threshold: float, version: int, geometry: np.ndarray,
                 anatomy: np.ndarray, error: str, quality: bytes, config: PostprocessConfig,
                 with_probability: bool, log: Log = _log, with_mask: bool = True) -> PhotoResult:
    """Photo `index`'s answer from its rows: the error report if it was unreadable, else mask, report and the
    probability PNG (if asked). Never raises."""
    if error:
        return PhotoResult(b"", error_report(index, error))
    try:
        result = postprocess(probability, Geometry.from_vector(geometry), threshold, version, config,
                             with_probability, Anatomy.from_vector(anatomy), QualityAssessment.from_json(quality),
                             with_mask)
    except Exception as exc:  # never let one photo fail the request
        log(f"postprocess: image {index} failed: {exc!r}")
        return PhotoResult(b"", error_report(index, f"postprocessing failed ({type(exc).__name__})"))
    result.report["image_index"] = index
    return PhotoResult(result.mask_png, result.report, result.probability_png)


def answer_photos(probability: np.ndarray, threshold: np.ndarray, version: np.ndarray, geometry: np.ndarray,
                  anatomy: np.ndarray, errors: Sequence[str], quality: Sequence[bytes], config: PostprocessConfig,
                  with_probability: bool, pool: Executor, log: Log = _log, with_mask: bool = True
                  ) -> list[PhotoResult]:
    """Every photo's answer, `pool`-parallel (OpenCV and zlib release the GIL). THRESHOLD [N, 1] and
    MODEL_VERSION [N, 1] come with the probabilities: each photo is thresholded as its own unet version says."""
    return list(pool.map(lambda i: answer_photo(
        i, probability[i], float(threshold[i][0]), int(version[i][0]), geometry[i], anatomy[i], errors[i],
        quality[i], config, with_probability, log, with_mask), range(len(errors))))
