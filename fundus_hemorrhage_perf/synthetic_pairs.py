"""Second-visit photographs made from one real photograph, with known truth: FIRE's equivalent where no
longitudinal set is available (FIRE: Hernandez-Matas et al., "FIRE: Fundus Image Registration dataset",
Modeling and Artificial Intelligence in Ophthalmology 1(4):16-28, 2017).

    scene    the baseline photo, with real haemorrhages inpainted out (cv2.inpaint, Telea) and real lesion
             patches from other photos blended in (multiplicative: the patch's ratio to its own inpainted
             background, so its darkness and texture travel, not its source's colour)
    warp     a known transform follow-up -> baseline pixels: homography or quadratic (Transform), with the
             rotation, scale and shift of a second visit; the follow-up is the scene sampled through it
    capture  the follow-up's own circular aperture, illumination gradient, colour balance, gamma, focus
             blur, sensor noise and JPEG compression; optionally another camera's resolution

Used by fundus_hemorrhage_perf/registration_eval.py (IDRiD photos) and tests/test_registration.py (samples/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from fundus_hemorrhage.registration import Transform


@dataclass
class Capture:
    """How the follow-up was photographed (all relative to the baseline)."""
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # B, G, R multipliers
    gamma: float = 1.0
    gradient: tuple[float, float] = (0.0, 0.0)  # relative brightness change per half-width along x, y
    blur_sigma: float = 0.0  # original pixels
    noise_sigma: float = 0.0  # grey levels
    jpeg_quality: int = 92
    size_factor: float = 1.0  # the follow-up camera's pixels relative to the baseline's (another camera)
    aperture: float = 0.96  # the follow-up's own circular field: radius in units of half its width


@dataclass
class WarpSpec:
    kind: str = "homography"  # or "quadratic"
    rotation_deg: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # baseline pixels
    perspective: tuple[float, float] = (0.0, 0.0)  # h31, h32 in units of 1 / (half width)
    curvature: tuple[float, ...] = (0.0,) * 6  # quadratic terms (x^2, xy, y^2) for x' and y', px at the corner


def make_transform(spec: WarpSpec, size: tuple[int, int], follow_up_size: tuple[int, int]) -> Transform:
    """The follow-up -> baseline transform for `spec`: around the photos' centres, the follow-up's pixels
    `size_factor` times the baseline's (follow_up_size / size)."""
    w, h = size
    fw, fh = follow_up_size
    s = w / 2.0
    to_centred = np.array([[1 / s * (w / fw), 0, -fw / 2 / s * (w / fw)],  # follow-up px -> centred, baseline units
                           [0, 1 / s * (w / fw), -fh / 2 / s * (w / fw)], [0, 0, 1]])
    a = math.radians(spec.rotation_deg)
    rs = spec.scale * np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    p = np.array([[1, 0, 0], [0, 1, 0], [spec.perspective[0], spec.perspective[1], 1]])
    back = np.array([[s, 0, w / 2 + spec.shift[0]], [0, s, h / 2 + spec.shift[1]], [0, 0, 1]])
    hm = back @ rs @ p @ to_centred
    homography = Transform("homography", hm / hm[2, 2])
    if spec.kind == "homography":
        return homography
    # Quadratic: the homography sampled and fitted as a quadratic, plus curvature terms in centred units.
    gx, gy = np.meshgrid(np.linspace(0, fw - 1, 24), np.linspace(0, fh - 1, 16))
    pts = np.c_[gx.ravel(), gy.ravel()]
    target = homography.apply(pts)
    u = (pts @ to_centred[:2, :2].T + to_centred[:2, 2]) * s  # centred follow-up, baseline pixels
    k = np.asarray(spec.curvature, np.float64).reshape(2, 3) / (s * s)
    target += np.stack([u[:, 0] ** 2, u[:, 0] * u[:, 1], u[:, 1] ** 2], 1) @ k.T
    from fundus_hemorrhage.registration import fit_quadratic
    return fit_quadratic(pts, target)


def warp_to_follow_up(scene: np.ndarray, transform: Transform, follow_up_size: tuple[int, int],
                      interpolation=cv2.INTER_LINEAR) -> np.ndarray:
    """Sample `scene` (baseline pixels) through `transform` (follow-up -> baseline) onto the follow-up grid."""
    fw, fh = follow_up_size
    if transform.kind == "homography":
        return cv2.warpPerspective(scene, transform.params, (fw, fh), flags=interpolation | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_CONSTANT)
    mx = np.empty((fh, fw), np.float32)
    my = np.empty((fh, fw), np.float32)
    x = np.arange(fw, dtype=np.float64)[None, :]
    (a0, a1, a2, a3, a4, a5), (b0, b1, b2, b3, b4, b5) = transform.params
    for r0 in range(0, fh, 512):  # exact per pixel, in row blocks (a full-size float64 grid is ~100 MB a plane)
        y = np.arange(r0, min(fh, r0 + 512), dtype=np.float64)[:, None]
        mx[r0:r0 + len(y)] = a0 * x * x + a1 * x * y + a2 * y * y + a3 * x + a4 * y + a5
        my[r0:r0 + len(y)] = b0 * x * x + b1 * x * y + b2 * y * y + b3 * x + b4 * y + b5
    return cv2.remap(scene, mx, my, interpolation, borderMode=cv2.BORDER_CONSTANT)


def capture(image: np.ndarray, cap: Capture, rng: np.random.Generator) -> bytes:
    """The follow-up photo's JPEG bytes: aperture, illumination, colour, gamma, blur, noise, compression."""
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    if cap.blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), cap.blur_sigma)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xs - w / 2) / (w / 2), (ys - h / 2) / (w / 2)
    light = 1.0 + cap.gradient[0] * u + cap.gradient[1] * v
    out *= light[..., None] * np.asarray(cap.gains, np.float32)
    out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** cap.gamma
    if cap.noise_sigma > 0:
        out += rng.normal(0, cap.noise_sigma, out.shape).astype(np.float32)
    aperture = (u * u + v * v) <= cap.aperture ** 2  # radius in units of half the width
    out *= aperture[..., None]
    ok, data = cv2.imencode(".jpg", np.clip(out, 0, 255).astype(np.uint8),
                            [cv2.IMWRITE_JPEG_QUALITY, int(cap.jpeg_quality)])
    return data.tobytes()


def fit_aperture(truth: Transform, size, baseline_fov) -> float:
    """The follow-up's own field (radius in half-widths) that stays inside the baseline's: a second visit's
    field is retina everywhere, and this scene has none beyond the baseline's field."""
    cx, cy, r = baseline_fov
    a = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    for aperture in np.arange(0.96, 0.5, -0.02):
        rim = np.c_[size[0] / 2 + aperture * size[0] / 2 * np.cos(a), size[1] / 2 + aperture * size[0] / 2 * np.sin(a)]
        inside = (rim[:, 1] < 0) | (rim[:, 1] >= size[1])  # beyond the frame: clipped anyway, as on the baseline
        q = truth.apply(rim)
        if (inside | ((q[:, 0] - cx) ** 2 + (q[:, 1] - cy) ** 2 <= (0.98 * r) ** 2)).all():
            return float(aperture)
    return 0.5


def control_points(transform: Transform, baseline_fov: tuple[float, float, float], follow_up_size: tuple[int, int],
                   rng: np.random.Generator, n: int = 10, aperture: float = 0.96) -> np.ndarray:
    """n follow-up points [n, 2], uniform in the part of the follow-up's field whose baseline place lies in the
    baseline's field (FIRE: 10 control points per pair, in the overlap)."""
    fw, fh = follow_up_size
    cx, cy, r = baseline_fov
    out = []
    for _ in range(200):
        p = rng.uniform([0, 0], [fw, fh], size=(256, 2))
        u, v = (p[:, 0] - fw / 2) / (fw / 2), (p[:, 1] - fh / 2) / (fw / 2)
        q = transform.apply(p)
        ok = (u * u + v * v <= (aperture * 0.95) ** 2) & ((q[:, 0] - cx) ** 2 + (q[:, 1] - cy) ** 2 <= (0.95 * r) ** 2)
        out.extend(p[ok].tolist())
        if len(out) >= n:
            break
    return np.asarray(out[:n], np.float64).reshape(-1, 2)


@dataclass
class Scene:
    """The baseline photo changed into the follow-up's retina: the BGR image and the truth, baseline pixels."""
    image: np.ndarray
    added: list[np.ndarray] = field(default_factory=list)  # bool masks [h, w]... stored as (x0, y0, mask crop)
    added_boxes: list[tuple[int, int]] = field(default_factory=list)
    removed: list[tuple[int, int, np.ndarray]] = field(default_factory=list)


def remove_lesions(image: np.ndarray, mask: np.ndarray, pick: list[int], labels: np.ndarray, stats: np.ndarray,
                   margin: int = 6) -> list[tuple[int, int, np.ndarray]]:
    """Inpaint (Telea, in place) the labelled components `pick` of a truth mask; returns each one's
    (x0, y0, bool crop)."""
    out = []
    for k in pick:
        x, y, w, h, _ = stats[k]
        x0, y0 = max(0, x - 4 * margin), max(0, y - 4 * margin)
        x1, y1 = min(image.shape[1], x + w + 4 * margin), min(image.shape[0], y + h + 4 * margin)
        own = (labels[y0:y1, x0:x1] == k).astype(np.uint8)
        # Grow the hole: the truth outlines are tight and the lesion's dark rim would otherwise remain.
        hole = cv2.dilate((mask[y0:y1, x0:x1] > 0).astype(np.uint8) & cv2.dilate(own, np.ones((9, 9), np.uint8)),
                          np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
        image[y0:y1, x0:x1] = cv2.inpaint(image[y0:y1, x0:x1], hole, 5, cv2.INPAINT_TELEA)
        out.append((int(x0), int(y0), own.astype(bool)))
    return out


def lesion_patch(image: np.ndarray, mask: np.ndarray, stats_row: np.ndarray, labels: np.ndarray, k: int):
    """A real lesion as (ratio [h, w, 3] float32 to its own background, bool mask [h, w]): the crop divided by
    the same crop with the lesion inpainted out."""
    x, y, w, h, _ = stats_row
    pad = 12
    x0, y0 = max(0, x - pad), max(0, y - pad)
    x1, y1 = min(image.shape[1], x + w + pad), min(image.shape[0], y + h + pad)
    crop = image[y0:y1, x0:x1]
    own = (labels[y0:y1, x0:x1] == k).astype(np.uint8)
    hole = cv2.dilate(own, np.ones((7, 7), np.uint8))
    background = cv2.inpaint(crop, hole, 5, cv2.INPAINT_TELEA).astype(np.float32)
    ratio = np.clip(crop.astype(np.float32) / np.maximum(background, 8.0), 0.15, 1.3)
    return ratio, own.astype(bool)


def add_lesion(image: np.ndarray, ratio: np.ndarray, own: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Blend a `lesion_patch` into `image` (in place) with its top-left at (x0, y0); returns the bool mask
    crop placed there (the truth). The lesion's outline is feathered over ~2 px."""
    h, w = own.shape
    alpha = cv2.GaussianBlur(own.astype(np.float32), (0, 0), 1.2)[..., None]
    region = image[y0:y0 + h, x0:x0 + w].astype(np.float32)
    region *= 1.0 + alpha * (ratio - 1.0)
    image[y0:y0 + h, x0:x0 + w] = np.clip(region, 0, 255).astype(np.uint8)
    return own
