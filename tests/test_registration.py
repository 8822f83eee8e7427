"""Registration (fundus_hemorrhage.registration) on the repository's sample photos with known synthetic warps
(fundus_hemorrhage_perf.synthetic_pairs): error at FIRE-style control points, refusals, the transform's
documented form. No Triton, no shared data."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fundus_hemorrhage import registration as reg
from fundus_hemorrhage.registration import Transform, fit_quadratic, overlap_fraction, photo_features, register
from fundus_hemorrhage_perf.synthetic_pairs import Capture, WarpSpec, capture, control_points, make_transform, \
    warp_to_follow_up
from tests.conftest import SAMPLES

PHOTO = SAMPLES / "IDRiD_04.jpg"


@pytest.fixture(scope="module")
def baseline():
    data = PHOTO.read_bytes()
    return data, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), photo_features(data)


def follow_up(image, spec: WarpSpec, cap: Capture, seed: int = 0):
    h, w = image.shape[:2]
    size = (int(round(w * cap.size_factor)), int(round(h * cap.size_factor)))
    truth = make_transform(spec, (w, h), size)
    return capture(warp_to_follow_up(image, truth, size), cap, np.random.default_rng(seed)), truth, size


def control_point_error(result, truth, size, seed=0) -> float:
    points = control_points(truth, (2144.0, 1424.0, 1900.0), size, np.random.default_rng(seed))
    assert len(points) == 10
    return float(np.linalg.norm(result.transform.apply(points) - truth.apply(points), axis=1).mean())


SECOND_VISITS = {
    "shifted_rotated_homography": (WarpSpec("homography", 6.0, 1.05, (220.0, -140.0), (0.02, -0.015)),
                                   Capture((0.9, 1.05, 1.1), 1.15, (0.15, -0.1), 1.5, 2.0, 88)),
    "quadratic_curvature": (WarpSpec("quadratic", -4.0, 0.95, (-150.0, 90.0), (0.0, 0.01),
                                     (25.0, -15.0, 20.0, -20.0, 10.0, 30.0)),
                            Capture((1.1, 0.9, 0.95), 0.85, (-0.2, 0.1), 0.8, 2.0, 92)),
    "other_camera_0.7x": (WarpSpec("homography", 3.0, 1.0, (60.0, 40.0)),
                          Capture((1.0, 1.1, 0.85), 1.0, (0.0, 0.0), 0.5, 1.0, 90, size_factor=0.7)),
}


@pytest.mark.parametrize("case", sorted(SECOND_VISITS))
def test_second_visit_registered_within_2_px(baseline, case):
    data, image, features = baseline
    spec, cap = SECOND_VISITS[case]
    photo, truth, size = follow_up(image, spec, cap)
    result = register(features, photo)
    assert result.ok, result.reason
    assert control_point_error(result, truth, size) < 2.0
    assert result.confidence > 0.5 and result.inliers >= reg.MIN_INLIERS
    # The inverse agrees with the forward transform.
    p = np.array([[1500.0, 1000.0], [2500.0, 1800.0]])
    assert np.abs(result.inverse.apply(result.transform.apply(p)) - p).max() < 1.0


def test_another_eye_is_not_registered(baseline):
    other = (SAMPLES / "IDRiD_11.jpg").read_bytes()
    result = register(baseline[2], other)
    assert result.status == reg.NO_REGISTRATION
    assert result.transform is None
    assert "vessel features" in result.reason or "no plausible registration" in result.reason


def test_a_mirrored_photo_is_not_registered(baseline):
    ok, mirrored = cv2.imencode(".jpg", cv2.flip(baseline[1], 1))
    result = register(baseline[2], mirrored.tobytes())
    assert result.status == reg.NO_REGISTRATION


def test_unreadable_photo_is_refused_with_its_reason(baseline):
    result = register(baseline[0], b"\xff\xd8\xff\xe0 not a photo")
    assert result.status == reg.UNREADABLE and result.reason.startswith("follow-up photo: ")


def test_overlap_fraction_of_a_large_shift(baseline):
    image = baseline[1]
    photo, truth, size = follow_up(image, WarpSpec("homography", 0.0, 1.0, (2400.0, 0.0)), Capture(aperture=0.9))
    result = register(baseline[2], photo)
    assert result.ok, result.reason
    fraction = overlap_fraction(result, (2144.0, 1424.0, 1900.0), (2144.0, 1424.0, 0.9 * 2144), (4288, 2848), size)
    assert fraction < reg.MIN_OVERLAP


def test_quadratic_monomial_order_is_the_documented_one():
    rng = np.random.default_rng(1)
    a = np.array([[2e-6, -1e-6, 3e-6, 1.01, 0.02, -30.0], [-1e-6, 4e-6, 1e-6, -0.015, 0.99, 12.0]])
    source = rng.uniform(0, 4000, (200, 2))
    x, y = source[:, 0], source[:, 1]
    target = np.stack([a[k, 0] * x * x + a[k, 1] * x * y + a[k, 2] * y * y + a[k, 3] * x + a[k, 4] * y + a[k, 5]
                       for k in range(2)], axis=1)
    fitted = fit_quadratic(source, target)
    assert np.allclose(fitted.params, a, rtol=1e-6, atol=1e-9)
    report = fitted.to_report()
    assert report["type"] == "quadratic" and report["monomials"] == ["x^2", "x*y", "y^2", "x", "y", "1"]
    again = Transform.from_report(report)
    assert np.allclose(again.apply(source), target, atol=1e-6)
    with pytest.raises(ValueError, match="not a transform"):
        Transform.from_report({"type": "quadratic", "coefficients": [[1, 2, 3]]})


def test_homography_report_round_trip():
    h = np.array([[1.02, 0.01, 30.0], [-0.01, 0.98, -12.0], [1e-6, -2e-6, 1.0]])
    t = Transform.from_report(Transform("homography", 2 * h).to_report())
    assert np.allclose(t.params, h)
    assert np.allclose(t.apply([[100.0, 200.0]]), Transform("homography", h).apply([[100.0, 200.0]]))
