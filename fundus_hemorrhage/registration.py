"""Registration of two colour fundus photographs of the same eye: follow-up pixel coordinates -> baseline pixel
coordinates, at the photos' own resolution.

    photo bytes (baseline, follow-up) -> decode at 1/REDUCTION (JPEG DCT scaling) -> green channel + CLAHE
    -> SIFT keypoints inside the field of view (vessels, bifurcations and crossings are where they land)
    -> ratio-test matches -> RANSAC homography (MAGSAC++) -> quadratic refinement on the inliers
    -> the transform scaled to original pixels, its confidence, or the reason it failed

Method: feature-based registration with a homography then a 12-parameter quadratic model, the model that accounts
for the retina's curvature (Can, Stewart, Roysam, Tanenbaum, "A feature-based, robust, hierarchical algorithm for
registering pairs of images of the curved human retina", IEEE TPAMI 24(3):347-364, 2002; used with SIFT-like
features by Adal et al., "Accuracy assessment of intra- and intervisit fundus image registration for diabetic
retinopathy screening", IOVS 56(3):1805-1812, 2015, and by RetinaRegNet, 2024). Keypoint coordinates
are taken to original pixels before any fit, so the transform needs no rescaling afterwards.

Quadratic coefficients, `coefficients` [2][6], monomial order (x^2, x*y, y^2, x, y, 1) as in Can et al.:
    x_baseline = a[0][0] x^2 + a[0][1] x y + a[0][2] y^2 + a[0][3] x + a[0][4] y + a[0][5]
    y_baseline = a[1][0] x^2 + ... + a[1][5]
with (x, y) follow-up pixel coordinates (pixel centres at integers, x right, y down, as stored).
A homography `matrix` [3][3] maps (x, y, 1) to (u, v, w) and (x_baseline, y_baseline) = (u / w, v / w).

Everything here is pure computation on decoded pixels (OpenCV), unit-tested without Triton. It never raises for a
photo: `register` returns a Registration whose `status` is "ok" or a reason code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from .jpeg import decode_bgr, reduced_size
from .preprocessing import ImageError, PreprocessConfig, fov_mask, find_field_of_view, read_header

REDUCTION = 4  # decode at 1/4: 4288x2848 -> 1072x712; SIFT keypoints there are located to ~0.3 px (1.2 px original)
MIN_REDUCED_WIDTH = 900  # smaller photos are decoded at 1/2 or whole: the vessel pattern needs ~1000 px across
SIFT_FEATURES = 3000
SIFT_CONTRAST = 0.01  # below OpenCV's 0.04: the CLAHE green channel of a fundus has low-contrast vessel detail
RATIO = 0.85  # Lowe's ratio test; looser than 0.8 because RANSAC follows and vessel patterns repeat
RANSAC_REDUCED_PX = 3.0  # inlier distance, pixels of the reduced baseline (12 original pixels at 1/4)
MIN_INLIERS = 25  # fewer: no registration. Different eyes of one side gave 6-12 (registration-eval.md)
QUADRATIC_MIN_INLIERS = 60  # 12 parameters: at least 5 inliers per parameter before the quadratic is tried
MIN_OVERLAP = 0.4  # fraction of the baseline's field of view; below, a visit comparison would miss most of the eye
FOV_EDGE = 0.94  # keypoints inside this fraction of the field's radius: the rim's bright edge is not anatomy

QUADRATIC_ORDER = ("x^2", "x*y", "y^2", "x", "y", "1")

# registration.status codes (the reason, in words, goes with them)
OK = "ok"
UNREADABLE = "unreadable"
UNGRADABLE = "ungradable"
DIFFERENT_EYES = "different_eyes"
NO_REGISTRATION = "no_registration"
TOO_LITTLE_OVERLAP = "too_little_overlap"


def _monomials(points: np.ndarray) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    return np.stack([x * x, x * y, y * y, x, y, np.ones_like(x)], axis=1)


@dataclass(frozen=True)
class Transform:
    """A map of pixel coordinates: "homography" (params [3, 3]) or "quadratic" (params [2, 6], QUADRATIC_ORDER)."""

    kind: str
    params: np.ndarray

    def apply(self, points) -> np.ndarray:
        """points [N, 2] (x, y) -> [N, 2] float64."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if self.kind == "homography":
            q = np.c_[p, np.ones(len(p))] @ self.params.T
            return q[:, :2] / q[:, 2:3]
        return _monomials(p) @ self.params.T

    def jacobian_determinant(self, points) -> np.ndarray:
        """Local area scale |det J| at points [N, 2] (numerical, 1 px steps): a follow-up area times this is the
        area in baseline pixels."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        dx = (self.apply(p + [0.5, 0]) - self.apply(p - [0.5, 0]))
        dy = (self.apply(p + [0, 0.5]) - self.apply(p - [0, 0.5]))
        return np.abs(dx[:, 0] * dy[:, 1] - dx[:, 1] * dy[:, 0])

    def to_report(self) -> dict:
        if self.kind == "homography":
            m = self.params / self.params[2, 2]
            return {"type": "homography", "matrix": [[float(v) for v in row] for row in m]}
        return {"type": "quadratic", "coefficients": [[float(v) for v in row] for row in self.params],
                "monomials": list(QUADRATIC_ORDER)}

    def inverted(self, size: tuple[int, int]) -> "Transform":
        """The inverse map over a (width, height) photo of the source side: exact for a homography; for a
        quadratic, a quadratic fitted on a 40x30 grid of the photo (its own inverse is not quadratic; the fit's
        error is far below a pixel for a second visit's curvature)."""
        if self.kind == "homography":
            return Transform("homography", np.linalg.inv(self.params))
        gx, gy = np.meshgrid(np.linspace(0, size[0], 40), np.linspace(0, size[1], 30))
        p = np.c_[gx.ravel(), gy.ravel()]
        return fit_quadratic(self.apply(p), p)

    @classmethod
    def from_report(cls, data: dict) -> "Transform":
        """From `to_report`'s dict. Raises ValueError for another type or a wrong shape."""
        kind = data.get("type")
        values = np.asarray(data.get("matrix" if kind == "homography" else "coefficients"), dtype=np.float64)
        if (kind, values.shape) not in (("homography", (3, 3)), ("quadratic", (2, 6))):
            raise ValueError(f"not a transform: type {kind!r}, shape {values.shape}")
        return cls(kind, values)


def fit_quadratic(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> Transform:
    """Least-squares quadratic source [N, 2] -> target [N, 2], N >= 6, solved on coordinates centred and scaled
    to ~1 (conditioning), then expanded to raw pixel coefficients. Raises ValueError for fewer than 6 points."""
    if len(source) < 6:
        raise ValueError(f"a quadratic needs at least 6 points, got {len(source)}")
    c, s = source.mean(axis=0), max(float(np.abs(source - source.mean(axis=0)).max()), 1.0)
    a = _monomials((source - c) / s)
    w = np.ones(len(source)) if weights is None else np.asarray(weights, np.float64)
    coef, *_ = np.linalg.lstsq(a * w[:, None], target * w[:, None], rcond=None)  # [6, 2] in normalised u, v
    # u = (x - cx)/s, v = (y - cy)/s: expand each normalised monomial into raw monomials of x, y.
    cx, cy = c
    basis = np.array([  # rows: u^2, uv, v^2, u, v, 1 in raw (x^2, xy, y^2, x, y, 1), times s^-degree
        [1, 0, 0, -2 * cx, 0, cx * cx],
        [0, 1, 0, -cy, -cx, cx * cy],
        [0, 0, 1, 0, -2 * cy, cy * cy],
        [0, 0, 0, 1, 0, -cx],
        [0, 0, 0, 0, 1, -cy],
        [0, 0, 0, 0, 0, 1]], dtype=np.float64)
    scale = np.array([s ** -2, s ** -2, s ** -2, 1 / s, 1 / s, 1.0])
    raw = (coef * scale[:, None]).T @ basis  # [2, 6]
    return Transform("quadratic", raw)


@dataclass
class PhotoFeatures:
    """SIFT keypoints of one photo, in original pixels. `size`: the photo's (width, height) as stored."""
    points: np.ndarray  # [K, 2] float32, original pixels
    descriptors: np.ndarray  # [K, 128] float32
    size: tuple[int, int]
    fov_center: tuple[float, float]
    fov_radius: float
    green: np.ndarray | None = field(default=None, repr=False)  # uint8 green channel at 1/REDUCTION

    def to_reduced(self, points: np.ndarray) -> np.ndarray:
        """Original-pixel coordinates [K, 2] -> coordinates on `green`."""
        sx, sy = self.size[0] / self.green.shape[1], self.size[1] / self.green.shape[0]
        return (np.asarray(points, np.float64) - [(sx - 1) / 2, (sy - 1) / 2]) / [sx, sy]


def decode_reduced(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    """Photo bytes -> (BGR uint8 at 1/REDUCTION, each side rounded up, or at 1/2 or whole when that would leave
    fewer than MIN_REDUCED_WIDTH pixels across; (width, height) as stored). JPEG is
    decoded at 1/4 by libjpeg's DCT scaling (fundus_hemorrhage.jpeg, several times faster than a full decode);
    other formats whole, then resized. EXIF orientation is not applied, as in preprocess. Raises ValueError
    (preprocessing.ImageError) when the bytes are not a readable photo."""
    fmt, width, height, _ = read_header(data, PreprocessConfig())
    factor = next((f for f in (REDUCTION, 2) if width / f >= MIN_REDUCED_WIDTH), 1)
    out = reduced_size(width, height, factor)
    bgr = decode_bgr(data, width, height, factor) if fmt == "JPEG" else None
    if bgr is None:
        full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if full is None:
            raise ImageError(f"{fmt} file could not be decoded")
        bgr = cv2.resize(full, out, interpolation=cv2.INTER_AREA)
    return bgr, (width, height)


def field_of_view(bgr: np.ndarray) -> tuple[np.ndarray, tuple[float, float], float]:
    """(mask uint8 {0, 1} of the illuminated disc, centre (x, y), radius) in the image's own pixels, as
    preprocess finds it (preprocessing.find_field_of_view). Raises ImageError when there is none."""
    fov = find_field_of_view(bgr)
    mask = fov_mask(bgr.shape[:2], fov.cx, fov.cy, fov.radius, (fov.x0, fov.y0, fov.x1, fov.y1))
    return mask, (fov.cx, fov.cy), fov.radius


def vessel_contrast(bgr: np.ndarray) -> np.ndarray:
    """uint8 green channel, CLAHE (clip 2, 8x8 tiles): vessels dark on an even background, whatever the
    illumination or colour balance of either visit."""
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(bgr[:, :, 1])


def photo_features(data: bytes) -> PhotoFeatures:
    """SIFT keypoints and descriptors of one photo, coordinates in original pixels. Raises ValueError when the
    bytes are not an image."""
    small, (width, height) = decode_reduced(data)
    fov, (cx, cy), radius = field_of_view(small)
    inner = np.zeros_like(fov)
    cv2.circle(inner, (int(round(cx)), int(round(cy))), max(1, int(radius * FOV_EDGE)), 1, -1)
    sift = cv2.SIFT_create(nfeatures=SIFT_FEATURES, contrastThreshold=SIFT_CONTRAST)
    keypoints, descriptors = sift.detectAndCompute(vessel_contrast(small), inner & fov)
    sx, sy = width / small.shape[1], height / small.shape[0]
    # A reduced pixel i covers original pixels [s i, s (i + 1)): its centre is at s i + (s - 1) / 2.
    points = np.array([k.pt for k in keypoints], np.float64).reshape(-1, 2) * [sx, sy] + [(sx - 1) / 2, (sy - 1) / 2]
    return PhotoFeatures(points.astype(np.float32),
                         descriptors if descriptors is not None else np.zeros((0, 128), np.float32),
                         (width, height), (cx * sx + (sx - 1) / 2, cy * sy + (sy - 1) / 2), radius * sx,
                         small[:, :, 1].copy())


@dataclass
class Registration:
    """The result of registering a follow-up photo to its baseline.

    status: OK or a reason code (UNREADABLE, UNGRADABLE, DIFFERENT_EYES, NO_REGISTRATION, TOO_LITTLE_OVERLAP);
    reason: the reason in words (None when OK). transform: follow-up -> baseline pixels (None unless OK or
    TOO_LITTLE_OVERLAP); inverse: baseline -> follow-up, fitted on the same inliers (for warping pictures and
    the overlap). confidence in [0, 1]: (inliers beyond MIN_INLIERS, saturating at 4x) times the share of the
    overlap's 4x4 grid cells that hold an inlier (a fit supported on one corner is not trusted across the field).
    rms_px: inlier residual of the chosen model, original baseline pixels.
    """

    status: str
    reason: str | None = None
    transform: Transform | None = None
    inverse: Transform | None = None
    confidence: float = 0.0
    matches: int = 0
    inliers: int = 0
    rms_px: float | None = None
    overlap_fraction: float | None = None
    seconds: float = 0.0
    inlier_points: np.ndarray | None = field(default=None, repr=False)  # [K, 2] follow-up pixels
    photos: tuple[PhotoFeatures, PhotoFeatures] | None = field(default=None, repr=False)  # (baseline, follow-up)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_report(self) -> dict:
        return {"status": self.status, "reason": self.reason,
                "transform": self.transform.to_report() if self.transform is not None and self.ok else None,
                "direction": "follow-up pixel coordinates -> baseline pixel coordinates",
                "confidence": round(self.confidence, 3), "matches": self.matches, "inliers": self.inliers,
                "rms_px": None if self.rms_px is None else round(self.rms_px, 3),
                "method": "SIFT on CLAHE green channel at 1/4 resolution, MAGSAC++ homography, quadratic refinement",
                "seconds": round(self.seconds, 3)}


def refused(status: str, reason: str, **kwargs) -> Registration:
    return Registration(status, reason, **kwargs)


def _match(follow_up: PhotoFeatures, baseline: PhotoFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Ratio-test matches, one per follow-up keypoint: (follow-up points [M, 2], baseline points [M, 2])."""
    if len(follow_up.points) < 2 or len(baseline.points) < 2:
        return np.zeros((0, 2)), np.zeros((0, 2))
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(follow_up.descriptors, baseline.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    f = np.array([follow_up.points[m.queryIdx] for m in good], np.float64).reshape(-1, 2)
    b = np.array([baseline.points[m.trainIdx] for m in good], np.float64).reshape(-1, 2)
    return f, b


def _residuals(t: Transform, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.linalg.norm(t.apply(source) - target, axis=1)


def _plausible(h: np.ndarray, follow_up: PhotoFeatures) -> str | None:
    """Why a homography cannot be two photos of one eye (a mirror, a scale beyond 0.5-2), else None."""
    cx, cy = follow_up.fov_center
    t = Transform("homography", h)
    det = float(t.jacobian_determinant([[cx, cy]])[0])
    a = h[:2, :2] / h[2, 2]
    if np.linalg.det(a) <= 0:
        return "the best transform mirrors the photo"
    if not 0.25 <= det <= 4.0:
        return f"the best transform scales the photo's area by {det:.2f}"
    return None


def _coverage(points: np.ndarray, center: tuple[float, float], radius: float) -> float:
    """Share of the 4x4 grid cells over the field's bounding square, inside the field, that hold a point."""
    cells = np.zeros((4, 4), bool)
    ij = np.floor((points - (np.asarray(center) - radius)) / (radius / 2)).astype(int)
    ok = (ij >= 0).all(axis=1) & (ij < 4).all(axis=1)
    cells[ij[ok, 1], ij[ok, 0]] = True
    inside = np.array([[math.hypot((i + 0.5) * radius / 2 - radius, (j + 0.5) * radius / 2 - radius) < radius
                        for i in range(4)] for j in range(4)])
    return float((cells & inside).sum() / inside.sum())


def fit_pair(follow_up: PhotoFeatures, baseline: PhotoFeatures) -> Registration:
    """Match and fit: follow-up -> baseline. status OK or NO_REGISTRATION (with the reason)."""
    f, b = _match(follow_up, baseline)
    if len(f) < MIN_INLIERS:
        return refused(NO_REGISTRATION, f"too few matching vessel features: {len(f)} candidate matches "
                                        f"(at least {MIN_INLIERS} needed)", matches=len(f))
    ransac_px = RANSAC_REDUCED_PX * baseline.size[0] / baseline.green.shape[1] if baseline.green is not None \
        else RANSAC_REDUCED_PX * REDUCTION
    h, keep = cv2.findHomography(f, b, cv2.USAC_MAGSAC, ransac_px, maxIters=5000, confidence=0.9999)
    inliers = int(keep.sum()) if keep is not None else 0
    if h is None or inliers < MIN_INLIERS:
        return refused(NO_REGISTRATION, f"too few geometrically consistent vessel features: {inliers} "
                                        f"(at least {MIN_INLIERS} needed)", matches=len(f), inliers=inliers)
    why = _plausible(h, follow_up)
    if why:
        return refused(NO_REGISTRATION, f"no plausible registration: {why}", matches=len(f), inliers=inliers)
    # Refit on all matches within the threshold, least squares (MAGSAC's model is from a minimal sample set).
    homography = Transform("homography", h)
    inl = _residuals(homography, f, b) < ransac_px
    h2, _ = cv2.findHomography(f[inl], b[inl], 0)
    homography = Transform("homography", h2 if h2 is not None else h)
    inl = _residuals(homography, f, b) < ransac_px
    transform, inverse = homography, Transform("homography", np.linalg.inv(homography.params))
    if inl.sum() >= QUADRATIC_MIN_INLIERS:
        transform, inverse, inl = _quadratic_refinement(f, b, inl, homography, ransac_px)
    fi, bi = f[inl], b[inl]
    rms = float(np.sqrt(np.mean(_residuals(transform, fi, bi) ** 2)))
    n = int(inl.sum())
    strength = min(1.0, (n - MIN_INLIERS) / (3.0 * MIN_INLIERS))
    confidence = max(0.0, strength) * _coverage(fi, follow_up.fov_center, follow_up.fov_radius)
    return Registration(OK, None, transform, inverse, confidence, len(f), n, rms, inlier_points=fi)


def _quadratic_refinement(f, b, inl, homography: Transform, ransac_px: float):
    """Quadratic fit on the homography's inliers, kept only when it predicts held-out inliers better (5-fold
    cross-validation): with few or badly spread points the 12 parameters would fit noise. Returns (forward,
    inverse, inliers)."""
    rng = np.random.default_rng(0)
    idx = np.flatnonzero(inl)
    folds = np.array_split(rng.permutation(idx), 5)
    err_h, err_q = [], []
    for k in range(5):
        test = folds[k]
        train = np.concatenate([folds[j] for j in range(5) if j != k])
        h, _ = cv2.findHomography(f[train], b[train], 0)
        if h is None:
            return homography, Transform("homography", np.linalg.inv(homography.params)), inl
        err_h.append(_residuals(Transform("homography", h), f[test], b[test]))
        err_q.append(_residuals(fit_quadratic(f[train], b[train]), f[test], b[test]))
    if np.median(np.concatenate(err_q)) >= np.median(np.concatenate(err_h)):
        return homography, Transform("homography", np.linalg.inv(homography.params)), inl
    quadratic = fit_quadratic(f[inl], b[inl])
    # One re-selection of inliers under the quadratic, then the final fit (Huber-like: a looser threshold would
    # let vessel-pattern mismatches pull the 12 parameters).
    inl = _residuals(quadratic, f, b) < ransac_px / 2
    if inl.sum() < QUADRATIC_MIN_INLIERS:
        return homography, Transform("homography", np.linalg.inv(homography.params)), \
            _residuals(homography, f, b) < ransac_px
    return fit_quadratic(f[inl], b[inl]), fit_quadratic(b[inl], f[inl]), inl


def overlap_fraction(registration: Registration, baseline_fov: tuple[float, float, float],
                     follow_up_fov: tuple[float, float, float], baseline_size: tuple[int, int],
                     follow_up_size: tuple[int, int], step: float = 16.0) -> float:
    """Share of the baseline's field of view (circle (cx, cy, r) clipped to the photo) that the follow-up's field
    also shows, sampled on a `step`-pixel grid of baseline pixels through the inverse transform."""
    cx, cy, r = baseline_fov
    w, h = baseline_size
    xs = np.arange(max(0.0, cx - r), min(w, cx + r), step)
    ys = np.arange(max(0.0, cy - r), min(h, cy + r), step)
    gx, gy = np.meshgrid(xs, ys)
    inside = (gx - cx) ** 2 + (gy - cy) ** 2 <= r * r
    points = np.c_[gx[inside], gy[inside]]
    if len(points) == 0:
        return 0.0
    q = registration.inverse.apply(points)
    fx, fy, fr = follow_up_fov
    fw, fh = follow_up_size
    seen = ((q[:, 0] - fx) ** 2 + (q[:, 1] - fy) ** 2 <= fr * fr) & (q[:, 0] >= 0) & (q[:, 1] >= 0) \
        & (q[:, 0] < fw) & (q[:, 1] < fh)
    return float(seen.mean())


def register(baseline: bytes | PhotoFeatures, follow_up: bytes | PhotoFeatures) -> Registration:
    """Register `follow_up` to `baseline` (photo bytes, or their `photo_features`). Never raises: status OK, or
    UNREADABLE / NO_REGISTRATION with the reason. Laterality, gradability and overlap against the photos'
    reports are checked by `fundus_hemorrhage.progression`, which has them."""
    start = time.perf_counter()
    try:
        b = baseline if isinstance(baseline, PhotoFeatures) else photo_features(baseline)
    except ValueError as exc:
        return refused(UNREADABLE, f"baseline photo: {exc}")
    try:
        f = follow_up if isinstance(follow_up, PhotoFeatures) else photo_features(follow_up)
    except ValueError as exc:
        return refused(UNREADABLE, f"follow-up photo: {exc}")
    result = fit_pair(f, b)
    result.photos = (b, f)
    result.seconds = time.perf_counter() - start
    return result
