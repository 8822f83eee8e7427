"""The change report (fundus_hemorrhage.progression) on visits whose masks and reports are made by the real report
code (report.lesion_report) from drawn lesions: every change kind, the zone tables against the single-visit
reports, the transform's part (a shifted follow-up), and each refusal with its reason. No Triton."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fundus_hemorrhage import registration as reg
from fundus_hemorrhage.geometry import Geometry
from fundus_hemorrhage.postprocessing import Lesion
from fundus_hemorrhage.progression import AREA_CHANGE, Visit, change_report, classify
from fundus_hemorrhage.registration import Registration, Transform
from fundus_hemorrhage.report import lesion_report
from fundus_hemorrhage.retinal_frame import Landmarks, nearest_pixel_distance

W, H = 1600, 1200
FOV = (800.0, 600.0, 580.0)
FOVEA, DISC, DISC_DD = (700.0, 620.0), (1100.0, 600.0), 160.0  # disc right of the fovea: a right eye


def visit(circles, shift=(0.0, 0.0), fovea=FOVEA, disc=DISC, status="ok") -> Visit:
    """A visit with filled circles (x, y, r) in baseline pixels, the photo shifted by `shift` (its pixels =
    baseline pixels - shift)."""
    dx, dy = shift
    mask = np.zeros((H, W), np.uint8)
    for x, y, r in circles:
        cv2.circle(mask, (int(x - dx), int(y - dy)), int(r), 255, -1)
    cx, cy, radius = FOV[0] - dx, FOV[1] - dy, FOV[2]
    geometry = Geometry(W, H, cx - radius, cy - radius, 2 * radius, cx, cy, radius, 0.0, 0.0, float(W), float(H),
                        float(W * H), 1)
    fov = (fovea[0] - dx, fovea[1] - dy)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    lesions = []
    for k in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[k])
        own = labels[y:y + h, x:x + w] == k
        lesions.append(Lesion(x, y, w, h, area, float(centroids[k][0]), float(centroids[k][1]), 0.5, 0.8,
                              nearest_pixel_distance(own, x, y, *fov)))
    lesions.sort(key=lambda les: (les.y, les.x))
    landmarks = Landmarks((disc[0] - dx, disc[1] - dy), DISC_DD, 0.9, None, fov, 0.9, None, cx)
    report = lesion_report(lesions, geometry, 0.2, "2", 10, landmarks)
    report["status"] = status
    return Visit(report, mask)


def translation(dx, dy) -> Registration:
    """follow-up -> baseline for a follow-up photo whose pixels are baseline pixels - (dx, dy)."""
    forward = Transform("homography", np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]]))
    inverse = Transform("homography", np.linalg.inv(forward.params))
    return Registration(reg.OK, None, forward, inverse, 0.9, 500, 400, 0.5)


BASELINE = [(700, 400, 20), (900, 800, 15), (500, 700, 12), (1000, 450, 18), (720, 615, 8)]
#           unchanged       enlarged x4     resolved        shrunk x1/4      unchanged, at the fovea
FOLLOW_UP = [(700, 400, 21), (900, 800, 30), (1000, 450, 9), (720, 615, 8), (600, 900, 14)]  # last: new


@pytest.mark.parametrize("shift", [(0.0, 0.0), (40.0, -25.0)])
def test_every_change_kind_is_found_and_counted(shift):
    report = change_report(visit(BASELINE), visit(FOLLOW_UP, shift), translation(*shift))
    assert report["status"] == "ok", report["registration"]
    assert report["summary"] == {"new": 1, "resolved": 1, "enlarged": 1, "shrunk": 1, "unchanged": 2,
                                 "uncertain": 0}
    by_kind = {}
    for entry in report["lesions"]:
        by_kind.setdefault(entry["change"], []).append(entry)
    new = by_kind["new"][0]
    assert new["centroid_baseline"]["x"] == pytest.approx(600, abs=1) and new["baseline_ids"] == []
    assert new["area_follow_up_mm2"] == pytest.approx(new["area_follow_up_px"] * (1800 / DISC_DD / 1000) ** 2, abs=1e-6)
    assert by_kind["enlarged"][0]["area_ratio"] == pytest.approx(4.0, rel=0.1)
    assert by_kind["resolved"][0]["follow_up_ids"] == []
    assert report["registration"]["transform"]["type"] == "homography"


def test_a_lesion_the_other_visit_shows_just_under_threshold_is_uncertain_not_new():
    baseline, follow_up = visit(BASELINE), visit(FOLLOW_UP)
    for v in (baseline, follow_up):
        v.probability = np.where(v.mask > 0, 200, 3).astype(np.uint8)
    report = change_report(baseline, follow_up, translation(0.0, 0.0))
    assert report["summary"]["new"] == 1 and report["summary"]["uncertain"] == 0
    cv2.circle(baseline.probability, (600, 900), 10, 40, -1)  # 40/255 = 0.157: under 0.2, above 0.5 x 0.2
    report = change_report(baseline, follow_up, translation(0.0, 0.0))
    assert report["summary"]["new"] == 0 and report["summary"]["uncertain"] == 1
    (entry,) = [e for e in report["lesions"] if e["change"] == "uncertain"]
    assert entry["other_visit_max_probability"] == pytest.approx(40 / 255, abs=1e-3)


def test_zone_tables_are_the_single_visit_tables_and_their_change():
    baseline, follow_up = visit(BASELINE), visit(FOLLOW_UP, (30.0, 10.0))
    report = change_report(baseline, follow_up, translation(30.0, 10.0))
    field = report["compared_field"]
    assert report["compared_field"]["overlap_fraction"] > 0.9
    assert sorted(field["baseline_ids"]) == [les["id"] for les in baseline.report["lesions"]]
    assert sorted(field["follow_up_ids"]) == [les["id"] for les in follow_up.report["lesions"]]
    for table, single in (("etdrs", "etdrs"), ("retinal_quadrants", "retinal_quadrants")):
        for zone, row in report[table].items():
            for name, v in (("baseline", baseline), ("follow_up", follow_up)):
                assert row[name]["count"] == v.report[single][zone]["count"], (table, zone, name)
                assert row[name]["area_mm2"] == pytest.approx(v.report[single][zone]["area_mm2"], abs=1e-5)
            assert row["change"]["count"] == row["follow_up"]["count"] - row["baseline"]["count"]
    near = report["findings"]["lesions_within_1dd_of_fovea"]
    assert near["baseline"]["count"] == baseline.report["findings"]["lesions_within_1dd_of_fovea"]["count"]
    assert near["change"] == near["follow_up"]["count"] - near["baseline"]["count"]
    assert report["findings"]["rule_4_2_1_hemorrhage_criterion_met"] == {"baseline": False, "follow_up": False,
                                                                         "changed": False}


def test_lesions_outside_the_common_field_are_not_compared():
    shift = (400.0, 0.0)  # the follow-up sees the baseline's right part only
    baseline = visit([(300, 600, 15), (1000, 600, 15)])
    follow_up = visit([(1000, 600, 15)], shift)
    report = change_report(baseline, follow_up, translation(*shift))
    assert report["status"] == "ok"
    assert 0.8 < report["compared_field"]["overlap_fraction"] < 0.95  # x >= 400 of a circle x in 220..1380
    # The lesion at x=300 lies outside the follow-up's field: neither "resolved" nor compared.
    assert report["summary"]["resolved"] == 0 and report["summary"]["unchanged"] == 1
    assert report["compared_field"]["lesions_outside"]["baseline"] == 1


def test_a_confident_registration_overrides_a_laterality_disagreement():
    follow_up = visit(FOLLOW_UP, disc=(300.0, 600.0))  # its laterality misjudged as left
    report = change_report(visit(BASELINE), follow_up, translation(0.0, 0.0))
    assert report["status"] == "ok" and "lateralities differ" in report["registration"]["laterality_note"]
    weak = translation(0.0, 0.0)
    weak.confidence = 0.2
    assert change_report(visit(BASELINE), follow_up, weak)["registration"]["status"] == reg.DIFFERENT_EYES


def test_area_change_threshold():
    assert classify(1000, 1000 * (1 + AREA_CHANGE), 10) == "enlarged"
    assert classify(1000, 1000 * (1 + AREA_CHANGE) - 1, 10) == "unchanged"
    assert classify(1000, 1000 / (1 + AREA_CHANGE) - 1, 10) == "shrunk"
    assert classify(20, 35, 10) == "unchanged"  # x 1.75 but only 1.5 min-lesion areas more: noise


@pytest.mark.parametrize("case, status, words", [
    ("different_eyes", reg.DIFFERENT_EYES, "different eyes: the baseline is a right eye, the follow-up a left eye"),
    ("ungradable", reg.UNGRADABLE, "follow-up photo is ungradable"),
    ("no_registration", reg.NO_REGISTRATION, "too few"),
    ("overlap", reg.TOO_LITTLE_OVERLAP, "too little overlap"),
    ("unreadable", reg.UNREADABLE, "follow-up photo: truncated JPEG"),
])
def test_refusals_name_their_reason_and_carry_no_comparison(case, status, words):
    baseline, follow_up, registration = visit(BASELINE), visit(FOLLOW_UP), translation(0, 0)
    if case == "different_eyes":  # disc on the fovea's left: a left eye, and the vessels do not register
        follow_up = visit(FOLLOW_UP, disc=(300.0, 600.0))
        registration = reg.refused(reg.NO_REGISTRATION, "too few matching vessel features: 4 candidate matches")
    elif case == "ungradable":
        follow_up.report.update(status="ungradable", image_quality={"gradable": False, "reasons": ["out of focus"]})
    elif case == "no_registration":
        registration = reg.refused(reg.NO_REGISTRATION, "too few matching vessel features: 3 candidate matches")
    elif case == "overlap":
        follow_up, registration = visit(FOLLOW_UP, (950.0, 0.0)), translation(950.0, 0.0)
    else:
        follow_up = Visit({"status": "error", "error": "truncated JPEG", "image_index": 1}, None)
    report = change_report(baseline, follow_up, registration)
    assert report["status"] == "refused"
    assert report["registration"]["status"] == status
    assert words in report["registration"]["reason"]
    assert report["summary"] is None and report["lesions"] is None and report["registration"]["transform"] is None
