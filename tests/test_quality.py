"""The image-quality gate (fundus_hemorrhage/quality.py) on generated photos, the samples and their degraded copies."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fundus_hemorrhage import quality
from fundus_hemorrhage.preprocessing import (ImageError, PreprocessConfig, decode_with_jpeg_quality, find_field_of_view,
                                             preprocess, read_header_and_jpeg_quality)
from fundus_hemorrhage_perf.quality_eval import DEGRADATIONS, UNGATED, degrade, dice, gate, gated_pipeline, mask_of
from tests.fundus import encode, synthetic_fundus

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "samples").glob("*.jpg"))
MODEL = Path(__file__).resolve().parents[1] / "model_repository" / "unet" / "2" / "model.onnx"


def verdict(data: bytes, thresholds: quality.QualityThresholds = quality.SERVING_THRESHOLDS
            ) -> quality.QualityAssessment:
    """The gate on encoded bytes, as preprocess runs it: on the decoded, reduced image, with the JPEG quality that
    preprocess reads from the header."""
    bgr, _, _, jpeg_quality = decode_with_jpeg_quality(data, PreprocessConfig())
    fov = find_field_of_view(bgr)
    return quality.assess(bgr, fov, jpeg_quality, thresholds)


def synthetic(transform=lambda bgr: bgr, thresholds: quality.QualityThresholds = quality.SERVING_THRESHOLDS
              ) -> quality.QualityAssessment:
    img, _ = synthetic_fundus(blobs=[(400, 300, 12), (520, 420, 8)])
    return verdict(encode(transform(img), ".png"), thresholds)


# --- generated photos -------------------------------------------------------------------------------------------

def test_synthetic_colour_fundus_is_gradable_and_normalised_to_the_typical_brightness():
    v = synthetic()
    assert v.gradable and v.reasons == ()
    assert v.exposure_gain * v.metrics.brightness == pytest.approx(quality.TYPICAL_BRIGHTNESS)
    assert v.to_report() == {"gradable": True, "reasons": [], "exposure_normalised": True,
                             "exposure_gain": round(v.exposure_gain, 4)}


def test_the_verdict_crosses_the_quality_tensor_unchanged():
    for v in (synthetic(), synthetic(lambda bgr: cv2.GaussianBlur(bgr, (0, 0), 6.0))):
        back = quality.QualityAssessment.from_json(v.to_json())
        assert (back.gradable, back.reasons, back.exposure_gain) == (v.gradable, v.reasons, v.exposure_gain)
        assert back.to_report() == v.to_report()
    with pytest.raises(ValueError):
        quality.QualityAssessment.from_json(b"")


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
    assert decode_with_jpeg_quality(encode(img, ".png"), PreprocessConfig())[3] is None


@pytest.mark.parametrize("q", [10, 50, 95])
def test_quality_eval_reports_the_jpeg_quality_that_serving_reads(q):
    """fundus_hemorrhage_perf/quality_eval.py's gate() has no rule of its own: it reports serving's estimate."""
    img, _ = synthetic_fundus()
    data = encode(img, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, q])
    served = read_header_and_jpeg_quality(data, PreprocessConfig())[1]
    assert gate(data)["jpeg_quality"] == round(served, 1) == pytest.approx(q, abs=1.5)
    assert gate(encode(img, ".png"))["jpeg_quality"] is None


def test_metrics_do_not_depend_on_the_resolution():
    img, _ = synthetic_fundus(width=1800, height=1400, seed=3)
    small = cv2.resize(img, (900, 700), interpolation=cv2.INTER_AREA)
    a, b = (quality.measure(x, find_field_of_view(x)) for x in (img, small))
    assert a.brightness == pytest.approx(b.brightness, abs=2)
    assert a.saturation == pytest.approx(b.saturation, abs=0.02)
    assert a.red_green_ratio == pytest.approx(b.red_green_ratio, abs=0.05)


@pytest.mark.parametrize("alpha, normalised", [(0.4, True), (0.7, False), (1.0, False), (1.4, True)])
def test_outside_range_policy_normalises_only_photos_outside_the_training_range(alpha, normalised):
    """The alternative policy (`QualityThresholds()`), kept measurable by fundus_hemorrhage_perf/quality_eval.py --policy."""
    v = synthetic(lambda bgr: cv2.convertScaleAbs(bgr, alpha=alpha), quality.QualityThresholds())
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
def test_sample_photos_are_gradable_and_normalised(path):
    v = verdict(path.read_bytes())
    assert v.gradable, v.reasons
    assert v.exposure_gain * v.metrics.brightness == pytest.approx(quality.TYPICAL_BRIGHTNESS)
    # the outside-range policy would leave them as they are
    assert verdict(path.read_bytes(), quality.QualityThresholds()).exposure_gain == 1.0


# --- the gate inside preprocessing (serving and training) ---------------------------------------------------------

def test_preprocess_normalises_a_gradable_photo_and_zeroes_an_ungradable_one():
    img, _ = synthetic_fundus(blobs=[(400, 300, 12)])
    dark = preprocess(encode(cv2.convertScaleAbs(img, alpha=0.5), ".png"))
    normal = preprocess(encode(img, ".png"))
    assert dark.quality.gradable and dark.quality.exposure_gain > 1.5
    # the same photo at half the exposure reaches the model almost as the normal one does
    assert float(np.abs(dark.pixels - normal.pixels).mean()) < 0.02
    grey = preprocess(encode(cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR), ".png"))
    assert not grey.quality.gradable and grey.quality.reasons == ("not a colour photograph",)
    assert not grey.pixels.any() and grey.geometry.width == img.shape[1]  # geometry kept, nothing resampled
    assert grey.geometry.fov_radius == pytest.approx(normal.geometry.fov_radius, rel=0.02)


def test_ungated_preprocessing_is_the_one_before_the_gate():
    """fundus_hemorrhage_perf/quality_eval.py's UNGATED arm (the service before the gate): no gain, nothing refused."""
    data = SAMPLES[0].read_bytes()
    pre = preprocess(data, PreprocessConfig(quality_thresholds=UNGATED))
    assert pre.quality.gradable and pre.quality.exposure_gain == 1.0
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert preprocess(degrade(full, "grayscale"), PreprocessConfig(quality_thresholds=UNGATED)).quality.gradable


@pytest.mark.parametrize("q", [10, 50, 95])
def test_the_header_gives_the_jpeg_quality_that_the_gate_checks(q):
    img, _ = synthetic_fundus()
    (fmt, *_), estimate = read_header_and_jpeg_quality(encode(img, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, q]),
                                                       PreprocessConfig())
    assert fmt == "JPEG" and estimate == pytest.approx(q, abs=1.5)
    assert read_header_and_jpeg_quality(encode(img, ".png"), PreprocessConfig())[1] is None
    pre = preprocess(encode(img, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, q]))
    assert ("heavily compressed" in pre.quality.reasons) == (q < quality.SERVING_THRESHOLDS.min_jpeg_quality)


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
                            "is segmented as is: Dice 0.47 / 0.34 (fundus_hemorrhage_perf/results/quality-gate.md)")),
    pytest.param(quality.SERVING_THRESHOLDS, id="served-normalise-every-photo"),
])
def test_every_degraded_sample_is_refused_or_segmented_like_the_normal_photo(thresholds):
    """The issue's check, in process: each degraded copy is reported ungradable, or its mask has Dice >= 0.5
    with the normal photo's mask (both through the serving path with the gate, and the served model)."""
    pipeline = gated_pipeline(MODEL, thresholds)
    failures = []
    try:
        for path in SAMPLES:
            data = path.read_bytes()
            normal = pipeline([data])[0]
            assert normal.gradable, normal.report
            full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            for name in DEGRADATIONS:
                try:
                    result = pipeline([degrade(full, name)])[0]
                except ImageError as exc:  # a one-photo request whose photo is refused, with the reason
                    assert str(exc).startswith("image 0: ") and len(str(exc)) > len("image 0: "), (path.name, name)
                    continue
                if result.report["status"] == "ungradable":
                    assert result.report["image_quality"]["reasons"], (path.name, name)
                    assert not mask_of(result.mask_png).any()
                    continue
                score = dice(mask_of(result.mask_png), mask_of(normal.mask_png))
                if score < 0.5:
                    failures.append((path.name, name, round(score, 3)))
    finally:
        pipeline.close()
    assert not failures


def test_the_service_default_is_the_served_policy():
    assert PreprocessConfig().quality_thresholds == quality.SERVING_THRESHOLDS == quality.NORMALISE_EVERY_PHOTO
