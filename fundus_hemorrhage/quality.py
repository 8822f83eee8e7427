"""Image-quality gate: is a decoded photo a gradable, well-exposed colour fundus photograph?

Pure functions on the decoded (possibly reduced) BGR image and its field of view (FOV, from
`preprocessing.find_field_of_view`). Every metric is measured on the FOV resampled so that its diameter is
`ANALYSIS_DIAMETER` pixels, so the numbers do not depend on the photo's resolution or on the decoder's
reduction, and inside the inner `INNER_FRACTION` of the disc (the rim is vignetted on every camera).

Why (fundus_hemorrhage_perf/results/quality-gate.md): the served model (unet v2) follows the FOV's brightness, not only the
structures: the same photo at x0.4 marks lesions everywhere (Dice with its normal mask median 0.10), at x0.6 still
6 of 18 below 0.5; grayscale and red-free copies give Dice ~0.05 and 0.0. CLAHE on the lightness does not undo a
global gain. One gain on all channels that brings the FOV's median luma to the training photos' typical level
(`normalise_exposure`) does: x0.25-x0.6 copies then segment at Dice median 0.87-0.92, and on the 53 labelled
photos accuracy is unchanged (mean Dice with the annotation 0.5508 as served, 0.5516 normalised), but it moves
the normal photos' masks (Dice 0.75-1.0, median 0.93, with the un-normalised ones).

The service normalises every gradable photo (`SERVING_THRESHOLDS` = `NORMALISE_EVERY_PHOTO`, the default of
`assess`/`judge`): exposure variants of a photo then give one mask, at no loss of accuracy
(fundus_hemorrhage_perf/results/quality-gate-every-photo.md). `preprocessing.preprocess_decoded` applies it, so training and serving
see the same pixels. The verdict travels between the ensemble's steps as the QUALITY tensor (`to_json`/`from_json`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import json

import cv2
import numpy as np

ANALYSIS_DIAMETER = 512  # px across the FOV on the analysis grid
INNER_FRACTION = 0.9  # of the FOV radius
CORE_EROSION = 17  # px on the analysis grid: detail measures stay clear of the disc's edge, the strongest structure

# libjpeg's quality-50 luminance quantisation table (ITU-T T.81 Annex K), whose scaling defines "quality".
_JPEG_LUMINANCE_Q50 = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)


@dataclass(frozen=True)
class QualityMetrics:
    brightness: float  # median luma (BT.601, 0-255) inside the FOV
    clipped_fraction: float  # FOV fraction with a channel at >= 250 (over-exposed: detail lost)
    saturation: float  # median HSV saturation (max - min) / max, 0-1
    red_green_ratio: float  # median red / median green
    contrast: float  # std of the green channel minus its 8-px-sigma background, / median green
    fine_to_mid: float  # std(g - blur1 g) / std(blur1 g - blur4 g): the finest detail relative to vessel-scale detail
    shadow_ratio: float  # 2nd percentile / median of the luma: low when the FOV holds the camera's (lifted) border


@dataclass(frozen=True)
class QualityAssessment:
    gradable: bool
    reasons: tuple[str, ...]  # empty when gradable
    metrics: QualityMetrics | None
    exposure_gain: float = 1.0  # the brightness normalisation applied before segmentation (1.0: none)

    @property
    def exposure_normalised(self) -> bool:
        return self.exposure_gain != 1.0

    def to_report(self) -> dict:
        """The report's `image_quality` object: {gradable, reasons}, and for a gradable photo whether its exposure
        was normalised and by which gain (rounded to 4 decimals)."""
        section = {"gradable": self.gradable, "reasons": list(self.reasons)}
        if self.gradable:
            section.update(exposure_normalised=self.exposure_normalised, exposure_gain=round(self.exposure_gain, 4))
        return section

    def to_json(self) -> bytes:
        """One element of the QUALITY tensor: JSON {"gradable", "reasons", "exposure_gain"} (metrics not carried)."""
        return json.dumps({"gradable": self.gradable, "reasons": list(self.reasons),
                           "exposure_gain": self.exposure_gain}).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "QualityAssessment":
        """Inverse of `to_json` (the gain round-trips exactly). Raises ValueError (json.JSONDecodeError) or KeyError
        on a malformed element."""
        d = json.loads(data)
        return cls(bool(d["gradable"]), tuple(str(r) for r in d["reasons"]), None, float(d["exposure_gain"]))


def analysis_view(bgr: np.ndarray, fov) -> tuple[np.ndarray, np.ndarray]:
    """The FOV's bounding box resampled to ANALYSIS_DIAMETER px across the disc (uint8 BGR), and the uint8 {0,1}
    mask of its inner disc."""
    crop = bgr[fov.y0:fov.y1, fov.x0:fov.x1]
    scale = ANALYSIS_DIAMETER / (2.0 * fov.radius)
    h, w = crop.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    view = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    inside = np.zeros(view.shape[:2], np.uint8)
    centre = (round((fov.cx - fov.x0) * scale), round((fov.cy - fov.y0) * scale))
    cv2.circle(inside, centre, round(INNER_FRACTION * fov.radius * scale), 1, -1)
    return view, inside


def _percentile(channel: np.ndarray, mask: np.ndarray, q: float = 50.0) -> float:
    """Percentile of a uint8 channel under a mask, from its histogram (no sort)."""
    hist = cv2.calcHist([channel], [0], mask, [256], [0, 256]).ravel()
    return float(np.searchsorted(np.cumsum(hist), hist.sum() * q / 100.0))


_median = _percentile


def _std(values: np.ndarray, mask: np.ndarray) -> float:
    return float(cv2.meanStdDev(values, mask=mask)[1][0, 0])


def measure(bgr: np.ndarray, fov) -> QualityMetrics:
    """Quality metrics of a decoded BGR uint8 photo [H, W, 3] with its `preprocessing.FieldOfView`."""
    view, inside = analysis_view(bgr, fov)
    n = max(1, cv2.countNonZero(inside))
    luma = cv2.cvtColor(view, cv2.COLOR_BGR2GRAY)
    saturation = cv2.cvtColor(view, cv2.COLOR_BGR2HSV)[..., 1]
    b, g, r = cv2.split(view)
    clipped = cv2.threshold(cv2.max(cv2.max(b, g), r), 249, 1, cv2.THRESH_BINARY)[1]
    med_g = max(1.0, _median(g, inside))
    gf = g.astype(np.float32)
    g1 = cv2.GaussianBlur(gf, (0, 0), 1.0)
    g4 = cv2.GaussianBlur(gf, (0, 0), 4.0)
    g8 = cv2.GaussianBlur(gf, (0, 0), 8.0)
    core = cv2.erode(inside, np.ones((CORE_EROSION, CORE_EROSION), np.uint8))
    brightness = _median(luma, inside)
    return QualityMetrics(
        brightness=brightness,
        clipped_fraction=cv2.countNonZero(clipped & inside) / n,
        saturation=_median(saturation, inside) / 255.0,
        red_green_ratio=_median(r, inside) / med_g,
        contrast=_std(gf - g8, core) / med_g,
        fine_to_mid=_std(gf - g1, core) / max(_std(g1 - g4, core), 1e-3),
        shadow_ratio=_percentile(luma, inside, 2.0) / max(1.0, brightness),
    )


def metrics_dict(metrics: QualityMetrics) -> dict[str, float]:
    return {k: round(v, 5) for k, v in asdict(metrics).items()}


def jpeg_quality(luminance_table: Sequence[int]) -> float:
    """The libjpeg quality (1-100) whose scaling of the Annex K table gives this 64-entry luminance quantisation
    table, in natural (row-major) order as PIL gives it: `Image.open(f).quantization[0]`.

    libjpeg: scale S = 5000 / q for q < 50, else 200 - 2 q (percent); entry = clip((Q50 * S + 50) // 100, 1, 255).
    S is the median of the entries' ratios, over the entries not clipped at 1 or 255 (over all when none is left).
    """
    table = np.asarray(luminance_table, dtype=np.float64).ravel()[:64]
    free = (table > 1) & (table < 255)
    ratios = 100.0 * table / _JPEG_LUMINANCE_Q50[: table.size]
    s = float(np.median(ratios[free] if free.any() else ratios))
    return float(np.clip(5000.0 / s if s > 100.0 else (200.0 - s) / 2.0, 1.0, 100.0))


TYPICAL_BRIGHTNESS = 104.0  # median FOV luma of the 54 IDRiD photos the model was trained on (56.9-136.0)


def normalise_exposure(bgr: np.ndarray, fov, target: float = TYPICAL_BRIGHTNESS,
                       brightness: float | None = None) -> np.ndarray:
    """The photo with its FOV's median luma scaled to `target`: one gain for every channel and pixel, so hue and
    the ratios between structures are kept (a camera's under-exposure is such a gain on the sensor values, and
    stays one after the sRGB curve, a power law). Pass `brightness` when already measured."""
    brightness = measure(bgr, fov).brightness if brightness is None else brightness
    return apply_exposure_gain(bgr, target / max(1.0, brightness))


def apply_exposure_gain(bgr: np.ndarray, gain: float) -> np.ndarray:
    """uint8 BGR times `gain` (`QualityAssessment.exposure_gain`), rounded and saturated at 255."""
    return bgr if gain == 1.0 else cv2.convertScaleAbs(bgr, alpha=gain)


@dataclass(frozen=True)
class QualityThresholds:
    """Limits of a gradable photo, measured with fundus_hemorrhage_perf/quality_eval.py (fundus_hemorrhage_perf/results/quality-gate.md): the 54 IDRiD
    photos (the model's training camera) and 18 degraded copies of each, every third photo served through unet v2
    for the Dice of its mask against the normal photo's; false rejections also counted, gate only, on the 777
    photos of five other collections (CHASE_DB1, DIARETDB1, DRIVE, HEI-MED, IDRiD grading). "IDRiD" below: the
    range over the 54 normal photos; "other": the 777."""
    # Median FOV luma below this: refused. IDRiD 57-136, other >= 28. x0.15 copies (9-16) normalised: Dice with the
    # normal mask down to 0.0 (4 of 18 < 0.5); x0.25 copies (14-26) at >= 20 normalised: Dice >= 0.66.
    min_brightness: float = 20.0
    # Gradable but darker than every IDRiD photo (57): normalised to TYPICAL_BRIGHTNESS before segmentation, so no
    # normal photo's mask changes. Normalised x0.4 copies: Dice >= 0.71 (median 0.92), 0.0-0.1 without. x0.6
    # copies inside the IDRiD range (34-62) stay as they are: 5 of 18 below Dice 0.5; 80 would fix them but change 4
    # of the 54 normal photos' masks (results: "normalise below" table).
    normalise_below: float = 56.0
    # ... to this median luma, not TYPICAL_BRIGHTNESS: a dark photo may have been a dim one (IDRiD_11: 57), and
    # copies x0.25-x0.6 of 8 photos (the 3 dimmest, 5 bright) served with Dice >= 0.53 at 85, but down to 0.44
    # (dim ones) at 104 and 0.26 (bright ones) at 70.
    dark_target: float = 85.0
    # Gradable but brighter than every IDRiD photo (136): normalised too. x1.8 copies (clipped): Dice >= 0.59
    # (median 0.86) as served, median 0.18 without normalisation.
    normalise_above: float = 140.0
    # Median red / green above this: the green channel is crushed (gamma 2.2 copies 2.9-15; served ones at 4.0-4.5
    # had Dice 0.03-0.45, normalised or not). IDRiD <= 3.33; other: 4 of 777 above.
    max_red_green_ratio: float = 3.6
    # Median FOV luma above this: over-exposed, refused. IDRiD <= 136, other <= 192. x2.5 copies (133-240)
    # normalised: Dice 0.64-0.96 up to 212, 0.28 at 215; those served: Dice >= 0.69. (Clipping alone is no reason:
    # x1.8 copies clipped over 99% of the FOV segment at Dice >= 0.81 once normalised.)
    max_brightness: float = 200.0
    # Median HSV saturation below this: a grayscale photo (grayscale and grey red-free copies 0.00; IDRiD >= 0.55,
    # other >= 0.25).
    min_saturation_colour: float = 0.15
    # Washed out: detail contrast below `washed_contrast` with saturation below `washed_saturation` or brightness
    # above `normalise_above` (washed-out copies: 0.025-0.040 and 0.24-0.49; gamma 0.45 copies served with Dice
    # < 0.5: 0.040-0.042 at 153-172; IDRiD: contrast >= 0.044, saturation >= 0.55), or detail contrast below
    # `min_contrast` alone. Other: 8 of 777 washed out in all.
    washed_saturation: float = 0.5
    washed_contrast: float = 0.045
    min_contrast: float = 0.03
    # 2nd percentile / median of the luma below this: uneven illumination, or a grey (lifted) camera border taken
    # into the field of view. IDRiD >= 0.47; other: 4 of 777 below (dark-shadowed DIARETDB1 / HEI-MED photos);
    # gamma 0.45 copies down to 0.17, those served with Dice < 0.5 at 0.22-0.265.
    min_shadow_ratio: float = 0.27
    # Red / green medians below this: a red-free (green-filter) photo (green-tinted copies 0.0-0.3; IDRiD >= 1.63,
    # other >= 0.93).
    min_red_green_ratio: float = 0.75
    # Fine / vessel-scale detail below this: out of focus. IDRiD >= 0.34, other: 2 of 777 below. Blur sigma 8 px
    # (at 4288 px): 53 of 54 copies below (served: Dice median 0.83, 1 of 18 < 0.5); sigma 4: Dice >= 0.83.
    min_fine_to_mid: float = 0.28
    # Estimated JPEG quality below this: compression artefacts. IDRiD's camera: 50; re-saved at 25: Dice >= 0.64
    # (median 0.89); at 10: median 0.42, 12 of 18 < 0.5.
    min_jpeg_quality: float = 24.0


# The served policy: every gradable photo normalised to TYPICAL_BRIGHTNESS. Exposure variants of a photo then give
# one mask (samples: every gradable copy x0.25-x2.5 at Dice >= 0.64 with the normal photo's), and accuracy is
# unchanged (53 labelled photos: mean Dice with the annotation 0.5508 un-normalised, 0.5516 normalised), but every
# normal photo's mask moves (Dice with the un-normalised one: median 0.93, min 0.75). `QualityThresholds()` (only
# photos outside the IDRiD range normalised) left gradable copies below Dice 0.5 (fundus_hemorrhage_perf/results/quality-gate.md).
NORMALISE_EVERY_PHOTO = QualityThresholds(normalise_below=float("inf"), dark_target=TYPICAL_BRIGHTNESS)
SERVING_THRESHOLDS = NORMALISE_EVERY_PHOTO


def assess(bgr: np.ndarray, fov, jpeg_quality: float | None = None,
           thresholds: QualityThresholds = SERVING_THRESHOLDS) -> QualityAssessment:
    """The gate's verdict on a decoded BGR uint8 photo with its FieldOfView, and the JPEG quality estimated from
    its luminance table (`jpeg_quality()`; None for other formats). See `judge`."""
    return judge(measure(bgr, fov), jpeg_quality, thresholds)


def judge(m: QualityMetrics, jpeg_quality: float | None = None,
          thresholds: QualityThresholds = SERVING_THRESHOLDS) -> QualityAssessment:
    """The verdict from measured metrics. Reasons, in the report's terms: "not a colour photograph",
    "red-free photograph", "under-exposed", "over-exposed", "washed out", "uneven illumination", "out of focus",
    "heavily compressed".
    A gradable photo darker than `normalise_below` gets the `exposure_gain` that brings its brightness to
    `dark_target`, one brighter than `normalise_above` to TYPICAL_BRIGHTNESS (`apply_exposure_gain`); others 1.0:
    segmented exactly as before."""
    t = thresholds
    reasons = []
    if m.saturation < t.min_saturation_colour:
        reasons.append("not a colour photograph")
    elif m.red_green_ratio < t.min_red_green_ratio:
        reasons.append("red-free photograph")
    else:  # exposure measures assume a colour fundus photo (a green-only photo has a low luma anyway)
        if m.brightness < t.min_brightness or m.red_green_ratio > t.max_red_green_ratio:
            reasons.append("under-exposed")
        if m.brightness > t.max_brightness:
            reasons.append("over-exposed")
        faint = m.saturation < t.washed_saturation or m.brightness > t.normalise_above
        if (faint and m.contrast < t.washed_contrast) or m.contrast < t.min_contrast:
            reasons.append("washed out")
        if m.shadow_ratio < t.min_shadow_ratio:
            reasons.append("uneven illumination")
    if m.fine_to_mid < t.min_fine_to_mid:
        reasons.append("out of focus")
    if jpeg_quality is not None and jpeg_quality < t.min_jpeg_quality:
        reasons.append("heavily compressed")
    gain = 1.0
    if not reasons and m.brightness < t.normalise_below:
        gain = t.dark_target / max(1.0, m.brightness)
    elif not reasons and m.brightness > t.normalise_above:
        gain = TYPICAL_BRIGHTNESS / m.brightness
    return QualityAssessment(not reasons, tuple(reasons), m, gain)
