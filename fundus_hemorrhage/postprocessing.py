"""Working-grid probability -> mask at the photo's own resolution, and the lesion report.

All maps at original resolution are uint8: probability as round(255 * p), which is also what the
PROBABILITY output carries, so the mask is exactly `probability >= ceil(255 * threshold)` inside the FOV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .anatomy_tensor import Anatomy
from .geometry import Geometry
from .png import encode_png
from .quality import QualityAssessment
from .report import NOT_ASSESSED, lesion_report, ungradable_report
from .retinal_frame import Landmarks


@dataclass(frozen=True)
class PostprocessConfig:
    """What postprocess adds to the model. The threshold is not here: it comes with each photo's probabilities,
    from the unet version that produced them (THRESHOLD)."""
    # Components smaller than this many working-grid pixels (scaled to original pixels) are specks:
    # the model cannot resolve anything smaller, so they are noise.
    min_lesion_working_px: float = 2.0


def threshold_level(threshold: float) -> int:
    """The uint8 probability level at and above which a pixel is a lesion."""
    return int(min(255, max(1, math.ceil(round(threshold * 255.0, 6)))))


def probability_levels(probability: np.ndarray) -> np.ndarray:
    """The model's [S, S] (or [1, S, S]) probabilities as uint8 round(255 p): the levels every mask is cut from."""
    prob = np.asarray(probability, dtype=np.float32)
    side = prob.shape[-1]
    return np.rint(np.clip(prob.reshape(side, side), 0.0, 1.0) * 255.0).astype(np.uint8)


def _fov_box(geometry: Geometry) -> tuple[int, int, int, int]:
    x0, y0 = max(0, int(math.floor(geometry.fov_x0))), max(0, int(math.floor(geometry.fov_y0)))
    x1 = min(geometry.width, int(math.ceil(geometry.fov_x1)))
    y1 = min(geometry.height, int(math.ceil(geometry.fov_y1)))
    return x0, y0, x1, y1


def _warp_window(prob8: np.ndarray, geometry: Geometry, window: tuple[int, int, int, int]) -> np.ndarray:
    """Bilinear uint8 probability on the original-grid window (x0, y0, x1, y1), zero outside the FOV.

    The sampling position of every original pixel is computed from its global coordinates, so that a pixel
    gets exactly the same value whichever window it is computed in (warpAffine's fixed-point arithmetic
    depends on the window's origin, which made the windowed mask and the full probability map differ by one
    level at some lesion borders).
    """
    x0, y0, x1, y1 = window
    m = geometry.original_to_working(prob8.shape[0])  # axis-aligned: x and y map separately
    xy = np.empty((y1 - y0, x1 - x0, 2), np.float32)  # one interleaved map: filled ~6x faster than two copies
    xy[..., 0] = (m[0, 0] * np.arange(x0, x1) + m[0, 2]).astype(np.float32)
    xy[..., 1] = (m[1, 1] * np.arange(y0, y1) + m[1, 2]).astype(np.float32)[:, None]
    # Replicate, not zero, past the grid's edge: the FOV disc touches it, and the FOV mask cuts outside anyway.
    out = cv2.remap(prob8, xy, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out *= original_fov_mask(geometry, window)
    return out


def probability_to_original(probability: np.ndarray, geometry: Geometry) -> np.ndarray:
    """uint8 probability map (round(255 p)) on the original H x W grid, zero outside the FOV."""
    out = np.zeros((geometry.height, geometry.width), dtype=np.uint8)
    x0, y0, x1, y1 = _fov_box(geometry)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = _warp_window(probability_levels(probability), geometry, (x0, y0, x1, y1))
    return out


def original_fov_mask(geometry: Geometry, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """uint8 {0,1} FOV mask on the original grid (or on a window x0, y0, x1, y1 of it)."""
    x0, y0, x1, y1 = window or (0, 0, geometry.width, geometry.height)
    mask = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    cv2.circle(mask, (int(round(geometry.fov_cx - x0)), int(round(geometry.fov_cy - y0))),
               int(round(geometry.fov_radius)), 1, thickness=-1)
    bx0, by0 = max(0, int(round(geometry.fov_x0 - x0))), max(0, int(round(geometry.fov_y0 - y0)))
    bx1, by1 = int(round(geometry.fov_x1 - x0)), int(round(geometry.fov_y1 - y0))
    mask[:by0] = 0
    mask[by1:] = 0
    mask[:, :bx0] = 0
    mask[:, bx1:] = 0
    return mask


def min_lesion_area(geometry: Geometry, config: PostprocessConfig, working_size: int) -> int:
    return max(1, int(round(config.min_lesion_working_px * (geometry.square_side / working_size) ** 2)))


@dataclass(frozen=True)
class Lesion:
    x: int  # bounding box, original pixels
    y: int
    width: int
    height: int
    area: int
    cx: float  # centroid
    cy: float
    mean_probability: float
    max_probability: float
    # From the fovea (original pixels) to the centre of the lesion's nearest pixel; None without a fovea.
    fovea_distance_px: float | None = None


def _candidate_windows(prob8: np.ndarray, level: int, geometry: Geometry) -> list[tuple[int, int, int, int]]:
    """Disjoint original-grid windows that hold every pixel whose interpolated probability can reach `level`.

    A bilinear value is a convex combination of 4 working pixels, so it reaches `level` only next to a working
    pixel that does: the working-grid hits, dilated, cover every such pixel. Working on these windows
    instead of the whole photo makes the cost follow the lesions, not the 12 megapixels.
    """
    hits = (prob8 >= level).astype(np.uint8)
    if not hits.any():
        return []
    hits = cv2.dilate(hits, np.ones((5, 5), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(hits, connectivity=8)
    s = geometry.square_side / prob8.shape[0]
    fx0, fy0, fx1, fy1 = _fov_box(geometry)
    boxes = []
    for x, y, w, h, _ in stats[1:].tolist():
        box = (max(fx0, int(math.floor(geometry.square_x0 + x * s)) - 2),
               max(fy0, int(math.floor(geometry.square_y0 + y * s)) - 2),
               min(fx1, int(math.ceil(geometry.square_x0 + (x + w) * s)) + 2),
               min(fy1, int(math.ceil(geometry.square_y0 + (y + h) * s)) + 2))
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append(box)
    # Merge overlapping boxes so that no lesion is seen twice.
    merged = True
    while merged:
        merged, out = False, []
        for box in boxes:
            for i, other in enumerate(out):
                if box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]:
                    out[i] = (min(box[0], other[0]), min(box[1], other[1]), max(box[2], other[2]),
                              max(box[3], other[3]))
                    merged = True
                    break
            else:
                out.append(box)
        boxes = out
    return boxes


def component_statistics(labels: np.ndarray, window: np.ndarray, origin: tuple[int, int],
                         fovea: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per component 1..K of `labels` (int32 [h, w], 0 background, every label present) on the window whose
    top-left pixel is `origin` (x, y) on the photo: the sum and the maximum of its uint8 `window` values, and the
    distance (pixels) from `fovea` (x, y) to its nearest pixel centre, 0 when the fovea lies in one of its pixels
    (retinal_frame.nearest_pixel_distance, for every component at once; None without a fovea). Arrays [K]."""
    ys, xs = np.nonzero(labels)
    component = labels[ys, xs]
    order = np.argsort(component, kind="stable")
    component, ys, xs = component[order], ys[order], xs[order]
    starts = np.flatnonzero(np.r_[True, component[1:] != component[:-1]])
    values = window[ys, xs].astype(np.int64)
    sums, maxima = np.add.reduceat(values, starts), np.maximum.reduceat(values, starts)
    if fovea is None:
        return sums, maxima, None
    fx, fy = fovea
    distances = np.sqrt(np.minimum.reduceat((xs + origin[0] - fx) ** 2 + (ys + origin[1] - fy) ** 2, starts))
    px, py = int(math.floor(fx + 0.5)) - origin[0], int(math.floor(fy + 0.5)) - origin[1]  # the fovea's pixel
    if 0 <= py < labels.shape[0] and 0 <= px < labels.shape[1] and labels[py, px]:
        distances[labels[py, px] - 1] = 0.0
    return sums, maxima, distances


def find_lesions(probability: np.ndarray, geometry: Geometry, threshold: float, min_area: int,
                 fovea: tuple[float, float] | None = None) -> tuple[np.ndarray, list[Lesion]]:
    """The 0/255 mask at the original size and its lesions (components of at least `min_area` pixels).

    Identical to thresholding `probability_to_original` and labelling the whole photo, at a fraction of the cost.
    With `fovea` (x, y original pixels), each lesion's `fovea_distance_px` is measured on its own labelled pixels.
    """
    prob8 = probability_levels(probability)
    level = threshold_level(threshold)
    mask = np.zeros((geometry.height, geometry.width), dtype=np.uint8)
    lesions = []
    for x0, y0, x1, y1 in _candidate_windows(prob8, level, geometry):
        window = _warp_window(prob8, geometry, (x0, y0, x1, y1))
        hits = cv2.threshold(window, level - 1, 255, cv2.THRESH_BINARY)[1]  # 255 where window >= level
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(hits, connectivity=8, ltype=cv2.CV_32S)
        areas = stats[1:, cv2.CC_STAT_AREA]
        for k in np.flatnonzero(areas < min_area) + 1:  # specks: off the mask (few and small)
            x, y, w, h, _ = stats[k].tolist()
            hits[y:y + h, x:x + w][labels[y:y + h, x:x + w] == k] = 0
        mask[y0:y1, x0:x1] = hits  # the windows are disjoint
        keep = np.flatnonzero(areas >= min_area) + 1
        if keep.size == 0:
            continue
        sums, maxima, distances = component_statistics(labels, window, (x0, y0), fovea)
        for k in keep.tolist():
            x, y, w, h, area = stats[k].tolist()
            lesions.append(Lesion(x + x0, y + y0, w, h, area, float(centroids[k][0]) + x0,
                                  float(centroids[k][1]) + y0, float(sums[k - 1]) / (255.0 * area),
                                  float(maxima[k - 1]) / 255.0, None if fovea is None else float(distances[k - 1])))
    lesions.sort(key=lambda les: (les.y, les.x))
    return mask, lesions


@dataclass
class PostprocessResult:
    mask_png: bytes
    report: dict
    probability_png: bytes  # b"" unless asked for


def postprocess(probability: np.ndarray, geometry: Geometry, threshold: float, model_version: str,
                config: PostprocessConfig = PostprocessConfig(), with_probability: bool = False,
                anatomy: Anatomy | None = None, image_quality: QualityAssessment = NOT_ASSESSED,
                with_mask: bool = True) -> PostprocessResult:
    """One photo: PROBABILITY [1, S, S] (or [S, S]) on the working grid, thresholded at the producing version's
    `threshold` -> mask PNG at the original size (b"" when `with_mask` is False: the report is the same), report,
    and the probability PNG if asked (else b"").

    `anatomy`: the photo's optic disc and fovea on the same working grid (a row of the ANATOMY tensor); without
    it the report's anatomical fields are null with the reason "detector not available".
    `image_quality`: the gate's verdict (a row of the QUALITY tensor). An ungradable photo is not segmented: an
    all-zero mask (and probability map, if asked) at the photo's size, and `report.ungradable_report`.
    """
    working_size = np.shape(probability)[-1]
    min_area = min_lesion_area(geometry, config, working_size)
    if not image_quality.gradable:
        empty = encode_png(np.zeros((geometry.height, geometry.width), np.uint8))
        report = ungradable_report(geometry, threshold, str(model_version), min_area, image_quality)
        return PostprocessResult(empty, report, empty if with_probability else b"")
    landmarks = Landmarks.from_anatomy(anatomy or Anatomy.unavailable(), geometry, working_size)
    mask, lesions = find_lesions(probability, geometry, threshold, min_area, landmarks.fovea)
    report = lesion_report(lesions, geometry, threshold, str(model_version), min_area, landmarks, image_quality)
    probability_png = encode_png(probability_to_original(probability, geometry)) if with_probability else b""
    return PostprocessResult(encode_png(mask) if with_mask else b"", report, probability_png)
