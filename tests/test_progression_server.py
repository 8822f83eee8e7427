"""hemorrhage_progression through the real Triton server: a second visit made from a sample photo with a known
warp comes back with both masks, the transform (checked at control points against the truth) and a change
report whose zone tables agree with the two single-visit reports; another eye and an unreadable photo are refused
with their reasons, a malformed request is refused as a whole, and the server keeps serving."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fundus_hemorrhage import client as service
from fundus_hemorrhage import contract as c
from fundus_hemorrhage.progression_client import compare, infer_pairs
from fundus_hemorrhage.registration import Transform
from fundus_hemorrhage_perf.synthetic_pairs import Capture, WarpSpec, capture, control_points, fit_aperture, \
    make_transform, warp_to_follow_up
from tests.conftest import SAMPLES, make_client

PHOTO = SAMPLES / "IDRiD_04.jpg"


@pytest.fixture(scope="module")
def second_visit():
    data = PHOTO.read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    truth = make_transform(WarpSpec("homography", 5.0, 1.03, (180.0, -120.0), (0.01, -0.01)), (w, h), (w, h))
    cap = Capture((0.95, 1.05, 1.1), 1.1, (0.1, -0.1), 1.0, 2.0, aperture=fit_aperture(truth, (w, h), (2144, 1424, 1900)))
    follow = capture(warp_to_follow_up(image, truth, (w, h)), cap, np.random.default_rng(0))
    return data, follow, truth, image


def test_a_second_visit_is_registered_and_compared(triton_server, second_visit):
    data, follow, truth, _ = second_visit
    client = make_client(triton_server, "grpc")
    (answer,) = compare(client, "grpc", [(data, follow)], timeout=120)
    report = answer.change_report
    assert report["status"] == "ok", report
    for result in (answer.baseline, answer.follow_up):
        mask = cv2.imdecode(np.frombuffer(result.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (2848, 4288) and result.report["status"] == "ok"
    transform = Transform.from_report(report["registration"]["transform"])
    points = control_points(truth, (2144.0, 1424.0, 1900.0), (4288, 2848), np.random.default_rng(1))
    assert np.linalg.norm(transform.apply(points) - truth.apply(points), axis=1).mean() < 2.0
    assert set(report["summary"]) == {"new", "resolved", "enlarged", "shrunk", "unchanged", "uncertain"}
    assert report["summary"]["new"] == 0  # nothing was added: the same retina, captured again
    assert report["compared_field"]["overlap_fraction"] > 0.7
    # The zone tables are the single-visit reports' lesions in the compared field, counted by their own zones.
    field = report["compared_field"]
    for visit, result, ids in (("baseline", answer.baseline, field["baseline_ids"]),
                               ("follow_up", answer.follow_up, field["follow_up_ids"])):
        lesions = [les for les in result.report["lesions"] if les["id"] in ids]
        for table, key in (("etdrs", "etdrs_subfield"), ("retinal_quadrants", "retinal_quadrant")):
            for zone, row in report[table].items():
                inside = [les for les in lesions if les[key] == zone]
                assert row[visit]["count"] == len(inside), (visit, table, zone)
                assert row[visit]["area_mm2"] == pytest.approx(sum(les["area_mm2"] for les in inside), abs=1e-5)
        if len(ids) == len(result.report["lesions"]):  # the whole photo compared: the single-visit tables
            assert {z: r[visit]["count"] for z, r in report["etdrs"].items()} == \
                {z: r["count"] for z, r in result.report["etdrs"].items()}
    # BASELINE_LESIONS is the ensemble's own report of that photo.
    (single,) = service.segment(client, "grpc", [data])
    assert single.report["lesions"] == answer.baseline.report["lesions"]


def test_another_eye_and_an_unreadable_photo_are_refused_with_reasons(triton_server, second_visit):
    data, _, _, image = second_visit
    mirrored = cv2.imencode(".jpg", cv2.flip(image, 1), [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    client = make_client(triton_server, "http")
    other_eye, unreadable = compare(client, "http", [(data, mirrored), (data, b"\xff\xd8 not a photo")], timeout=120)
    assert other_eye.change_report["status"] == "refused"
    assert other_eye.change_report["registration"]["status"] == "different_eyes"
    assert "left eye" in other_eye.change_report["registration"]["reason"]
    assert other_eye.baseline.ok and other_eye.follow_up.ok  # both visits are still answered
    assert unreadable.change_report["registration"]["status"] == "unreadable"
    assert unreadable.change_report["registration"]["reason"].startswith("follow-up photo: ")
    assert unreadable.follow_up.report["status"] == "error" and unreadable.follow_up.mask_png == b""
    assert unreadable.baseline.ok


def test_a_malformed_request_is_refused_and_the_server_keeps_serving(triton_server):
    from tritonclient.utils import InferenceServerException
    import tritonclient.grpc as grpcclient

    client = make_client(triton_server, "grpc")
    baseline = grpcclient.InferInput(c.BASELINE, [2, 1], "BYTES")
    baseline.set_data_from_numpy(np.array([[b"a"], [b"b"]], dtype=np.object_))
    follow = grpcclient.InferInput(c.FOLLOW_UP, [1, 1], "BYTES")
    follow.set_data_from_numpy(np.array([[b"a"]], dtype=np.object_))
    with pytest.raises(InferenceServerException):
        client.infer(c.PROGRESSION, [baseline, follow])
    result = infer_pairs(client, "grpc", [(b"x", b"y")])
    assert b'"unreadable"' in result.as_numpy(c.CHANGE_REPORT)[0, 0]
    (ok,) = service.segment(client, "grpc", [(SAMPLES / "IDRiD_11.jpg").read_bytes()])
    assert ok.ok


def test_segment_py_compare_writes_the_pictures_and_the_index_page(triton_server, second_visit, tmp_path):
    import segment

    data, follow, _, _ = second_visit
    baseline_path, follow_path = tmp_path / "visit1.jpg", tmp_path / "visit2.jpg"
    baseline_path.write_bytes(data)
    follow_path.write_bytes(follow)
    out = tmp_path / "out"
    assert segment.main(["--compare", str(baseline_path), str(follow_path), "--output", str(out),
                         "--url", triton_server.grpc_url]) == 0
    for name in ("visit1_vs_visit2_change.json", "visit1_vs_visit2_side_by_side.jpg",
                 "visit1_vs_visit2_difference.png", "visit1_vs_visit2_difference_thumb.jpg",
                 "visit1_overlay.png", "visit2_mask.png"):
        assert (out / name).is_file(), name
    difference = cv2.imread(str(out / "visit1_vs_visit2_difference.png"))
    assert difference.shape[:2] == (1424, 2144)  # half the baseline's size
    page = (out / "index.html").read_text()
    assert 'id="comparisons"' in page and 'data-name="visit1_vs_visit2"' in page
    assert "visit1_vs_visit2_difference.png" in page
