"""Unit tests of fundus_hemorrhage.postprocessing (and png, report), and the geometry round trip preprocess -> postprocess."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from fundus_hemorrhage.anatomy_tensor import FOUND, REASONS, UNAVAILABLE, Anatomy
from fundus_hemorrhage.contract import REPORT_SCHEMA_VERSION
from fundus_hemorrhage.geometry import Geometry
from fundus_hemorrhage.png import encode_png
from fundus_hemorrhage.postprocessing import (PostprocessConfig, component_statistics, find_lesions, min_lesion_area,
                                              original_fov_mask, postprocess, probability_to_original, threshold_level)
from fundus_hemorrhage.preprocessing import preprocess, to_working
from fundus_hemorrhage.quality import QualityAssessment
from fundus_hemorrhage.report import UNGRADABLE_ANATOMY, error_report
from fundus_hemorrhage.retinal_frame import nearest_pixel_distance
from tests.conftest import REPO_ROOT, SAMPLE_PHOTOS
from tests.fundus import encode, synthetic_fundus

S = 640


def _geometry(width=1000, height=800, radius=380.0) -> Geometry:
    cx, cy = width / 2, height / 2
    return Geometry(width, height, cx - radius, cy - radius, 2 * radius, cx, cy, radius, cx - radius,
                    max(0.0, cy - radius), cx + radius, min(height, cy + radius), np.pi * radius**2)


def _decode(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def test_threshold_level():
    assert threshold_level(0.5) == 128  # round(255 * p) >= 128  <=>  p >= 0.5 (to within 1/510)
    assert threshold_level(0.0) == 1
    assert threshold_level(1.0) == 255
    assert threshold_level(100 / 255) == 100


@pytest.mark.parametrize("photo", SAMPLE_PHOTOS[:2], ids=lambda p: p.name)
def test_geometry_round_trip_on_real_photo(photo):
    """A mask drawn in original coordinates survives preprocess -> (working grid) -> postprocess."""
    pre = preprocess(photo.read_bytes())
    g = pre.geometry
    truth = np.zeros((g.height, g.width), np.uint8)
    blobs = [(int(g.fov_cx), int(g.fov_cy), 120), (int(g.fov_cx - 700), int(g.fov_cy + 500), 60),
             (int(g.fov_cx + 900), int(g.fov_cy - 600), 90)]
    for x, y, r in blobs:
        cv2.circle(truth, (x, y), r, 255, -1)
    working = to_working(truth, g, S).astype(np.float32) / 255.0  # what a perfect model would output
    result = postprocess(working[None], g, 0.5, 1)
    mask = _decode(result.mask_png)
    assert mask.shape == (g.height, g.width)
    inter = np.count_nonzero((mask > 0) & (truth > 0))
    union = np.count_nonzero((mask > 0) | (truth > 0))
    assert inter / union > 0.93
    report = result.report
    assert report["totals"]["count"] == 3
    for (x, y, r), lesion in zip(sorted(blobs), sorted(report["lesions"], key=lambda les: les["centroid"]["x"])):
        assert abs(lesion["centroid"]["x"] - x) < 3 and abs(lesion["centroid"]["y"] - y) < 3
        assert abs(lesion["area_px"] / (np.pi * r * r) - 1) < 0.08


def test_probability_map_is_round_255p_inside_the_fov_only():
    g = _geometry()
    prob = np.full((1, S, S), 0.8, np.float32)
    result = postprocess(prob, g, 0.5, 1, with_probability=True)
    p8 = _decode(result.probability_png)
    assert p8.shape == (800, 1000) and p8.dtype == np.uint8
    fov = original_fov_mask(g)
    assert set(np.unique(p8[fov > 0])) == {204}  # round(255 * 0.8)
    assert p8[fov == 0].max() == 0
    assert postprocess(prob, g, 0.5, 1).probability_png == b""


def test_specks_are_removed_and_lesions_reported():
    g = _geometry()
    prob = np.zeros((S, S), np.float32)
    prob[300:320, 300:330] = 0.9  # a lesion, top-left of the centre
    prob[400:410, 350:355] = 0.6  # another, lower right, weaker
    prob[100, 320] = 0.99  # a one-pixel speck: below the minimum area
    result = postprocess(prob[None], g, 0.5, 1)
    report = json.loads(json.dumps(result.report))  # JSON-serialisable
    assert report["schema_version"] == REPORT_SCHEMA_VERSION and report["status"] == "ok"
    assert report["totals"]["count"] == 2
    strong, weak = sorted(report["lesions"], key=lambda les: -les["max_probability"])
    assert strong["max_probability"] == pytest.approx(0.9, abs=0.01)
    assert strong["mean_probability"] <= strong["max_probability"]
    assert strong["quadrant"] == "upper_left" and weak["quadrant"] == "lower_right"
    mask = _decode(result.mask_png)
    assert np.count_nonzero(mask) == report["totals"]["area_px"] == strong["area_px"] + weak["area_px"]
    assert set(np.unique(mask)) <= {0, 255}
    assert report["quadrants"]["upper_left"]["count"] == 1 and report["quadrants"]["lower_right"]["count"] == 1
    assert report["totals"]["area_fov_fraction"] == pytest.approx(report["totals"]["area_px"] / g.fov_area, rel=1e-4)
    assert report["min_lesion_area_px"] == min_lesion_area(g, PostprocessConfig(), S)
    bx = strong["bbox"]
    assert mask[bx["y"]:bx["y"] + bx["height"], bx["x"]:bx["x"] + bx["width"]].any()


def test_without_anatomy_the_anatomical_fields_are_null_with_a_reason():
    prob = np.zeros((S, S), np.float32)
    prob[300:320, 300:330] = 0.9
    report = postprocess(prob[None], _geometry(), 0.5, 1).report
    assert report["totals"]["count"] == 1
    assert report["optic_disc"] is None and report["fovea"] is None and report["scale"] is None
    assert report["eye"] == {"laterality": "unknown", "method": None}
    assert report["anatomy_reasons"]["optic_disc"] == REASONS[UNAVAILABLE]
    assert report["retinal_quadrants"] is None and report["etdrs"] is None and report["findings"] is None
    lesion = report["lesions"][0]
    for key in ("distance_to_fovea_dd", "distance_to_fovea_um", "area_mm2", "retinal_quadrant", "etdrs_subfield"):
        assert lesion[key] is None, key


def test_lesion_distance_is_to_its_nearest_own_pixel_and_zones_follow_the_report():
    g = _geometry()  # 1000 x 800, working pixel = 760 / 640 original px
    prob = np.zeros((S, S), np.float32)
    prob[300:340, 200:204] = 0.9  # a thin vertical lesion left of the fovea
    prob[310:316, 420:440] = 0.9  # one right of the fovea, towards the disc
    # Fovea at working (320, 320), disc at (560, 300): a right eye (disc on the photo's right), DD 100 working px.
    anatomy = Anatomy(560.0, 300.0, 100.0, 0.9, FOUND, 320.0, 320.0, 0.8, FOUND)
    result = postprocess(prob[None], g, 0.5, 1, anatomy=anatomy)
    report = json.loads(json.dumps(result.report))
    assert report["eye"]["laterality"] == "right"
    fx, fy = report["fovea"]["center"]["x"], report["fovea"]["center"]["y"]
    dd = report["optic_disc"]["diameter_px"]
    mask = _decode(result.mask_png) > 0
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    assert count - 1 == report["totals"]["count"] == 2
    for lesion in report["lesions"]:
        b = lesion["bbox"]
        label = labels[b["y"] + b["height"] // 2, b["x"]:b["x"] + b["width"]].max()
        ys, xs = np.nonzero(labels == label)
        nearest = np.sqrt((xs - fx) ** 2 + (ys - fy) ** 2).min()
        assert lesion["distance_to_fovea_dd"] == pytest.approx(nearest / dd, abs=1e-3)
        assert lesion["distance_to_fovea_um"] == pytest.approx(nearest * 1800 / dd, abs=0.1)
    left, right = sorted(report["lesions"], key=lambda les: les["centroid"]["x"])
    assert right["retinal_quadrant"].endswith("nasal") and left["retinal_quadrant"].endswith("temporal")
    assert sum(z["count"] for z in report["etdrs"].values()) == 2
    assert sum(z["count"] for z in report["retinal_quadrants"].values()) == 2


def test_nothing_outside_the_field_of_view():
    g = _geometry()
    prob = np.ones((1, S, S), np.float32)
    prob8 = probability_to_original(prob, g)
    assert prob8[0, 0] == 0 and prob8[400, 500] == 255


def test_empty_prediction_gives_an_empty_mask_and_report():
    g = _geometry()
    result = postprocess(np.zeros((1, S, S), np.float32), g, 0.5, 1)
    assert _decode(result.mask_png).max() == 0
    assert result.report["lesions"] == [] and result.report["totals"]["count"] == 0


def test_an_ungradable_photo_gets_an_empty_mask_and_no_lesions_whatever_the_probabilities():
    g = _geometry()
    refused = QualityAssessment(False, ("under-exposed", "out of focus"), None)
    result = postprocess(np.ones((1, S, S), np.float32), g, 0.5, 2, with_probability=True,
                         anatomy=Anatomy(320, 300, 60, 0.9, FOUND, 200, 320, 0.8, FOUND), image_quality=refused)
    for png in (result.mask_png, result.probability_png):  # at the photo's own size, all zero
        image = _decode(png)
        assert image.shape == (g.height, g.width) and image.max() == 0
    r = result.report
    assert r["status"] == "ungradable" and r["schema_version"] == REPORT_SCHEMA_VERSION
    assert r["image_quality"] == {"gradable": False, "reasons": ["under-exposed", "out of focus"]}
    assert r["lesions"] == [] and r["totals"] == {"count": 0, "area_px": 0, "area_fov_fraction": 0.0}
    assert r["image"]["width"] == g.width and r["field_of_view"]["radius"] == round(g.fov_radius, 1)
    assert r["model"]["version"] == "2"
    assert r["optic_disc"] is None and r["fovea"] is None and r["findings"] is None
    assert r["anatomy_reasons"]["optic_disc"] == r["anatomy_reasons"]["fovea"] == UNGRADABLE_ANATOMY


def test_a_gradable_photo_reports_its_exposure_normalisation():
    report = postprocess(np.zeros((1, S, S), np.float32), _geometry(), 0.5, 1,
                         image_quality=QualityAssessment(True, (), None, 1.23456)).report
    assert report["status"] == "ok"
    assert report["image_quality"] == {"gradable": True, "reasons": [], "exposure_normalised": True,
                                       "exposure_gain": 1.2346}


def test_error_report():
    r = error_report(3, "not an image file")
    assert r["status"] == "error" and r["image_index"] == 3 and "not an image" in r["error"]


def test_synthetic_photo_round_trip_through_preprocess_and_postprocess():
    """A mask drawn on a generated PNG photo survives preprocess -> (working grid) -> postprocess, in process."""
    img, truth = synthetic_fundus(1200, 900, blobs=[(500, 400, 40), (800, 600, 25)])
    pre = preprocess(encode(img, ".png"))
    working = to_working(truth, pre.geometry, S).astype(np.float32) / 255.0
    mask = _decode(postprocess(working[None], pre.geometry, 0.5, 1).mask_png)
    assert mask.shape == truth.shape
    inter, union = np.count_nonzero((mask > 0) & (truth > 0)), np.count_nonzero((mask > 0) | (truth > 0))
    assert inter / union > 0.85


def test_windowed_lesions_equal_thresholding_the_whole_photo():
    """find_lesions works on windows around the hits; it must equal labelling the full-size map."""
    g = preprocess(SAMPLE_PHOTOS[0].read_bytes()).geometry
    rng = np.random.default_rng(1)
    prob = cv2.GaussianBlur(rng.random((S, S)).astype(np.float32), (0, 0), 3)
    prob = np.clip((prob - prob.mean()) * 12 + 0.3, 0, 1)  # many blobs of all sizes, some touching the FOV edge
    min_area = min_lesion_area(g, PostprocessConfig(), S)
    mask, lesions = find_lesions(prob, g, 0.5, min_area)
    full = probability_to_original(prob, g) >= threshold_level(0.5)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(full.astype(np.uint8), connectivity=8)
    big = stats[1:, cv2.CC_STAT_AREA] >= min_area
    expected = np.isin(labels, np.flatnonzero(big) + 1)
    assert len(lesions) == int(big.sum()) > 5
    assert np.array_equal(mask > 0, expected)
    assert sorted(les.area for les in lesions) == sorted(stats[1:, cv2.CC_STAT_AREA][big].tolist())


def test_png_encoder_round_trips():
    img = (np.random.default_rng(0).random((37, 53)) * 255).astype(np.uint8)
    assert np.array_equal(_decode(encode_png(img)), img)


@pytest.mark.parametrize("shape,rows", [((300, 257), (5, 6, 100, 170, 171)), ((70, 9), ()), ((1, 4), (0,)),
                                        ((200, 33), tuple(range(200)))])
def test_png_encoder_with_zero_and_non_zero_row_runs(shape, rows):
    from PIL import Image
    import io
    img = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(2)
    for r in rows:
        img[r] = rng.integers(0, 256, shape[1])
    png = encode_png(img)
    assert np.array_equal(_decode(png), img)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), img)  # a second, stricter decoder (CRC, Adler)


def test_mask_is_the_thresholded_probability_map_exactly():
    """The mask (computed on windows) and PROBABILITY (the whole FOV) agree pixel for pixel, on real model output.

    (With warpAffine per window they did not: its fixed-point arithmetic depends on the window's origin, and a
    few border pixels per photo came out one level apart.)
    """
    import onnxruntime as ort
    unet = REPO_ROOT / "model_repository" / "unet"
    newest = max((d for d in unet.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    session = ort.InferenceSession(str(newest / "model.onnx"), providers=["CPUExecutionProvider"])
    for photo in SAMPLE_PHOTOS:
        pre = preprocess(photo.read_bytes())
        prob = session.run(None, {"PIXELS": pre.pixels[None]})[0][0]
        p8 = probability_to_original(prob, pre.geometry)
        for threshold in (0.0627, 0.3, 0.5):
            mask, _ = find_lesions(prob, pre.geometry, threshold, 1)
            assert np.array_equal(mask > 0, p8 >= threshold_level(threshold)), (photo.name, threshold)


@pytest.mark.parametrize("where", ["none", "inside", "between", "outside"])
def test_component_statistics_equal_each_component_measured_alone(where):
    """The vectorised per-lesion sums, maxima and fovea distances equal the one-component-at-a-time definitions
    (retinal_frame.nearest_pixel_distance), wherever the fovea is: in a lesion, between them, off the window."""
    rng = np.random.default_rng(7)
    window = cv2.GaussianBlur(rng.integers(0, 256, (120, 200), dtype=np.uint8), (9, 9), 3) * 2
    count, labels, _, _ = cv2.connectedComponentsWithStats((window > 140).astype(np.uint8), connectivity=8,
                                                           ltype=cv2.CV_32S)
    assert count > 5
    origin = (100, 20)
    ys, xs = np.nonzero(labels == 3)
    gy, gx = np.nonzero(labels == 0)
    fovea = {"none": None, "inside": (xs[0] + origin[0] + 0.2, ys[0] + origin[1] - 0.3),
             "between": (gx[len(gx) // 2] + origin[0] + 0.4, gy[len(gy) // 2] + origin[1]),
             "outside": (10_000.0, -40.5)}[where]
    sums, maxima, distances = component_statistics(labels, window, origin, fovea)
    for k in range(1, count):
        own = labels == k
        assert sums[k - 1] == int(window[own].sum()) and maxima[k - 1] == int(window[own].max())
        if fovea is None:
            assert distances is None
        else:
            assert distances[k - 1] == nearest_pixel_distance(own, *origin, *fovea)
    if where == "inside":
        assert distances[2] == 0.0
