"""Working-grid probability -> mask at the photo's own resolution, and the lesion report.

All maps at original resolution are uint8: probability as round(255 * p), which is also what the
PROBABILITY output carries, so the mask is exactly `probability >= ceil(255 * threshold)` inside the FOV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from preprocess_backend import Geometry

REPORT_SCHEMA_VERSION = "1.0"
QUADRANTS = ("upper_left", "upper_right", "lower_left", "lower_right")

# PNG of a 0/255 mask: one-pass Huffman-only zlib is ~10x faster than the default and barely larger,
# because the mask is almost all zeros.
_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


@dataclass(frozen=True)
class PostprocessConfig:
    threshold: float = 0.5
    # Components smaller than this many working-grid pixels (scaled to original pixels) are specks:
    # the model cannot resolve anything smaller, so they are noise.
    min_lesion_working_px: float = 2.0


def threshold_level(threshold: float) -> int:
    """The uint8 probability level at and above which a pixel is a lesion."""
    return int(min(255, max(1, math.ceil(round(threshold * 255.0, 6)))))


def probability_to_original(probability: np.ndarray, geometry: Geometry) -> np.ndarray:
    """uint8 probability map (round(255 p)) on the original H x W grid, zero outside the FOV.

    `probability` is the model's square working grid, [S, S] (or [1, S, S]).
    """
    prob = np.asarray(probability, dtype=np.float32)
    working_size = prob.shape[-1]
    prob = prob.reshape(working_size, working_size)
    prob8 = np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
    w, h = geometry.width, geometry.height
    # Only the FOV box can be non-zero: warp into that window, not the whole photo.
    x0, y0 = max(0, int(math.floor(geometry.fov_x0))), max(0, int(math.floor(geometry.fov_y0)))
    x1, y1 = min(w, int(math.ceil(geometry.fov_x1))), min(h, int(math.ceil(geometry.fov_y1)))
    out = np.zeros((h, w), dtype=np.uint8)
    if x1 <= x0 or y1 <= y0:
        return out
    m = geometry.working_to_original(working_size)
    m[0, 2] -= x0
    m[1, 2] -= y0
    # Replicate, not zero, past the grid's edge: the FOV disc touches it, and the FOV mask cuts outside anyway.
    window = cv2.warpAffine(prob8, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    window *= original_fov_mask(geometry, (x0, y0, x1, y1))
    out[y0:y1, x0:x1] = window
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


@dataclass
class Segmentation:
    mask: np.ndarray  # uint8 {0, 255}, H x W
    labels: np.ndarray  # int32 component labels after speck removal (0 = background)
    stats: np.ndarray  # cv2 component stats of the kept lesions, one row per lesion
    centroids: np.ndarray


def segment(prob8: np.ndarray, geometry: Geometry, config: PostprocessConfig, min_area: int) -> Segmentation:
    binary = (prob8 >= threshold_level(config.threshold)).astype(np.uint8)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_area) + 1
    if keep.size < count - 1:  # relabel so kept lesions are 1..K and specks vanish
        lut = np.zeros(count, dtype=np.int32)
        lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
        labels = lut[labels]
    mask = np.where(labels > 0, np.uint8(255), np.uint8(0)) if keep.size else np.zeros_like(binary)
    return Segmentation(mask, labels, stats[keep], centroids[keep])


def quadrant_of(x: float, y: float, geometry: Geometry) -> str:
    """Quadrant of the FOV as the photo is stored (image axes: up is row 0), split at the FOV centre."""
    return ("upper_" if y < geometry.fov_cy else "lower_") + ("left" if x < geometry.fov_cx else "right")


def lesion_report(seg: Segmentation, prob8: np.ndarray, geometry: Geometry, config: PostprocessConfig,
                  model_name: str, model_version: str, min_area: int) -> dict:
    fov_area = max(1.0, geometry.fov_area)
    n = len(seg.stats)
    flat = np.flatnonzero(seg.labels) if n else np.empty(0, dtype=np.int64)
    ids = seg.labels.reshape(-1)[flat]
    probs = prob8.reshape(-1)[flat].astype(np.float64) / 255.0
    sums = np.bincount(ids, weights=probs, minlength=n + 1)[1:]
    maxes = np.zeros(n + 1)
    np.maximum.at(maxes, ids, probs)

    lesions, quadrants = [], {q: {"count": 0, "area_px": 0} for q in QUADRANTS}
    for i, (x, y, w, h, area) in enumerate(seg.stats.tolist()):
        cx, cy = (float(v) for v in seg.centroids[i])
        quadrant = quadrant_of(cx, cy, geometry)
        quadrants[quadrant]["count"] += 1
        quadrants[quadrant]["area_px"] += area
        lesions.append({
            "id": i + 1,
            "bbox": {"x": x, "y": y, "width": w, "height": h},
            "centroid": {"x": round(cx, 1), "y": round(cy, 1)},
            "area_px": area,
            "area_fov_fraction": round(area / fov_area, 7),
            "mean_probability": round(float(sums[i]) / area, 4),
            "max_probability": round(float(maxes[i + 1]), 4),
            "quadrant": quadrant,
        })
    total_area = int(sum(les["area_px"] for les in lesions))
    for q in quadrants.values():
        q["area_fov_fraction"] = round(q["area_px"] / fov_area, 7)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "status": "ok",
        "image": {"width": geometry.width, "height": geometry.height, "exif_orientation": geometry.exif_orientation},
        "field_of_view": {
            "center": {"x": round(geometry.fov_cx, 1), "y": round(geometry.fov_cy, 1)},
            "radius": round(geometry.fov_radius, 1),
            "bbox": {"x": round(geometry.fov_x0), "y": round(geometry.fov_y0),
                     "width": round(geometry.fov_x1 - geometry.fov_x0),
                     "height": round(geometry.fov_y1 - geometry.fov_y0)},
            "area_px": int(round(geometry.fov_area)),
        },
        "model": {"name": model_name, "version": str(model_version)},
        "threshold": config.threshold,
        "min_lesion_area_px": min_area,
        "lesions": lesions,
        "totals": {"count": n, "area_px": total_area, "area_fov_fraction": round(total_area / fov_area, 7)},
        "quadrants": quadrants,
    }


def error_report(index: int, reason: str) -> dict:
    return {"schema_version": REPORT_SCHEMA_VERSION, "status": "error", "image_index": index, "error": reason}


def encode_png(gray: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", gray, _PNG_FAST)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


@dataclass
class PostprocessResult:
    mask_png: bytes
    report: dict
    probability_png: bytes  # b"" unless asked for


def postprocess(probability: np.ndarray, geometry: Geometry, config: PostprocessConfig, model_name: str = "unet",
                model_version: str = "", with_probability: bool = False) -> PostprocessResult:
    prob8 = probability_to_original(probability, geometry)
    min_area = min_lesion_area(geometry, config, np.shape(probability)[-1])
    seg = segment(prob8, geometry, config, min_area)
    report = lesion_report(seg, prob8, geometry, config, model_name, model_version, min_area)
    return PostprocessResult(encode_png(seg.mask), report, encode_png(prob8) if with_probability else b"")
