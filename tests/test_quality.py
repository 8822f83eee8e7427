"""The image-quality gate (fundus_hemorrhage/quality.py) on generated photos, the samples and their degraded copies."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fundus_hemorrhage import quality
from fundus_hemorrhage.preprocessing import ImageError, PreprocessConfig, decode, find_field_of_view
from perf.quality_eval import DEGRADATIONS, GatedPipeline, degrade, dice, jpeg_quality_of, mask_of
from tests.fundus import encode, synthetic_fundus

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "samples").glob("*.jpg"))
MODEL = Path(__file__).resolve().parents[1] / "model_repository" / "unet" / "2" / "model.onnx"


def verdict(data: bytes) -> quality.QualityAssessment:
    """The gate on encoded bytes, as preprocess will run it: on the decoded, reduced image."""
    bgr, _, (fmt, *_) = decode(data, PreprocessConfig())
    fov = find_field_of_view(bgr)
    return quality.assess(bgr, fov, jpeg_quality_of(data) if fmt == "JPEG" else None)


def synthetic(transform=lambda bgr: bgr) -> quality.QualityAssessment:
    img, _ = synthetic_fundus(blobs=[(400, 300, 12), (520, 420, 8)])
    return verdict(encode(transform(img), ".png"))


# --- generated photos -------------------------------------------------------------------------------------------

def test_synthetic_colour_fundus_is_gradable():
    v = synthetic()
    assert v.gradable and v.reasons == () and v.exposure_gain == 1.0
    assert v.to_report() == {"gradable": True, "reasons": []}


@pytest.mark.parametrize("transform, reason", [
    (lambda bgr: cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR), "not a colour photograph"),
    (lambda bgr: cv2.merge([np.zeros_like(bgr[..., 1]), bgr[..., 1], np.zeros_like(bgr[..., 1])]),
     "red-free photograph"),
    (lambda bgr: cv2.convertScaleAbs(bgr, alpha=0.15), "under-exposed"),
    (lambda bgr: cv2.convertScaleAbs(bgr, alpha=2.5, beta=60), "over-exposed"),
    (lambda bgr: cv2.GaussianBlur(bgr, (0, 0), 6.0), "out of focus"),
    (lambda bgr: cv2.convertScaleAbs(bgr, alpha=0.5, beta=100), "washed out"),
])
def test_synthetic_degradations_are_refused_with_their_reason(transform, reason):
    v = synthetic(transform)
    assert not v.gradable
    assert reason in v.reasons
    assert v.to_report() == {"gradable": False, "reasons": list(v.reasons)}


@pytest.mark.parametrize("q", [10, 25, 50, 75, 90, 97])
def test_jpeg_quality_is_recovered_from_the_quantisation_table(q):
    img, _ = synthetic_fundus()
    data = encode(img, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, q])
    with Image.open(io.BytesIO(data)) as im:
        assert quality.jpeg_quality(im.quantization[0]) == pytest.approx(q, abs=1.5)
    assert jpeg_quality_of(encode(img, ".png")) is None


def test_metrics_do_not_depend_on_the_resolution():
    img, _ = synthetic_fundus(width=1800, height=1400, seed=3)
    small = cv2.resize(img, (900, 700), interpolation=cv2.INTER_AREA)
    a, b = (quality.measure(x, find_field_of_view(x)) for x in (img, small))
    assert a.brightness == pytest.approx(b.brightness, abs=2)
    assert a.saturation == pytest.approx(b.saturation, abs=0.02)
    assert a.red_green_ratio == pytest.approx(b.red_green_ratio, abs=0.05)


@pytest.mark.parametrize("alpha, normalised", [(0.4, True), (0.7, False), (1.0, False), (1.4, True)])
def test_only_photos_outside_the_training_range_are_normalised(alpha, normalised):
    v = synthetic(lambda bgr: cv2.convertScaleAbs(bgr, alpha=alpha))
    assert v.gradable, v.reasons
    assert (v.exposure_gain != 1.0) == normalised, v.metrics.brightness
    if normalised:  # dark photos to the gate's dark target, bright ones to the training photos' typical level
        target = quality.QualityThresholds().dark_target if alpha < 1 else quality.TYPICAL_BRIGHTNESS
        assert v.exposure_gain * v.metrics.brightness == pytest.approx(target)


def test_normalise_exposure_scales_the_fov_to_the_typical_brightness_and_keeps_the_hue():
    img, _ = synthetic_fundus()
    dark = cv2.convertScaleAbs(img, alpha=0.45)
    fov = find_field_of_view(dark)
    out = quality.normalise_exposure(dark, fov)
    m = quality.measure(out, fov)
    assert m.brightness == pytest.approx(quality.TYPICAL_BRIGHTNESS, abs=3)
    assert m.red_green_ratio == pytest.approx(quality.measure(img, fov).red_green_ratio, abs=0.1)


# --- the samples and their degraded copies ----------------------------------------------------------------------

@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_sample_photos_are_gradable_as_they_are(path):
    v = verdict(path.read_bytes())
    assert v.gradable, v.reasons
    assert v.exposure_gain == 1.0  # a normal photo is segmented exactly as before the gate


REFUSED = {  # degradation -> the reason the gate must give, on every sample
    "brightness_0.15": "under-exposed",
    "gamma_2.2": "under-exposed",
    "washed_out": "washed out",
    "jpeg_q10": "heavily compressed",
    "grayscale": "not a colour photograph",
    "red_free_grey": "not a colour photograph",
    "red_free_green": "red-free photograph",
    "red_free_tinted": "red-free photograph",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_degraded_samples_are_refused_with_the_reason(name):
    for path in SAMPLES:
        full = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        v = verdict(degrade(full, name))
        assert not v.gradable and REFUSED[name] in v.reasons, (path.name, v.reasons, v.metrics)


def test_darkened_samples_are_normalised_not_refused():
    for path in SAMPLES:
        full = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        v = verdict(degrade(full, "brightness_0.4"))
        assert v.gradable and v.exposure_gain > 1.5, (path.name, v.reasons, v.metrics)


@pytest.mark.slow
@pytest.mark.parametrize("thresholds", [
    pytest.param(quality.QualityThresholds(), id="normalise-outside-idrid-range", marks=pytest.mark.xfail(
        strict=True, reason="IDRiD_11, the dimmest sample (57), over-exposed x1.8 / x2.5 lands inside the range and "
                            "is segmented as is: Dice 0.47 / 0.34 (perf/results/quality-gate.md)")),
    pytest.param(quality.NORMALISE_EVERY_PHOTO, id="normalise-every-photo"),
])
def test_every_degraded_sample_is_refused_or_segmented_like_the_normal_photo(thresholds):
    """The issue's check, in process: each degraded copy is reported ungradable, or its mask has Dice >= 0.5
    with the normal photo's mask (both through the gated serving path and the served model)."""
    pipeline = GatedPipeline.from_onnx(MODEL, thresholds=thresholds)
    failures = []
    try:
        for path in SAMPLES:
            data = path.read_bytes()
            normal = pipeline([data])[0]
            assert normal.ok, normal.report
            full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            for name in DEGRADATIONS:
                try:
                    result = pipeline([degrade(full, name)])[0]
                except ImageError as exc:  # a one-photo request whose photo is refused, with the reason
                    assert str(exc).startswith("image 0: ") and len(str(exc)) > len("image 0: "), (path.name, name)
                    continue
                score = dice(mask_of(result.mask_png), mask_of(normal.mask_png))
                if score < 0.5:
                    failures.append((path.name, name, round(score, 3)))
    finally:
        pipeline.close()
    assert not failures
