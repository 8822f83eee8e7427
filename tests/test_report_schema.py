"""Report schema 2.0 through the real server: the clinician's frame on real photos, checked against the report's
own numbers (every lesion's distance, retinal quadrant and ETDRS subfield recomputed here, independently, from its
centroid or its pixels in the returned mask and the report's disc and fovea), and the null path on a photo
without a visible optic disc."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from fundus_hemorrhage import contract as c
from tests.conftest import infer, make_client
from tests.fundus import encode
from tests.test_anatomy import no_disc_fundus

ANATOMICAL = ("distance_to_fovea_dd", "distance_to_fovea_um", "area_mm2", "retinal_quadrant", "etdrs_subfield")
QUADRANTS = {"superotemporal", "superonasal", "inferotemporal", "inferonasal"}
BLOBS = ((700, 600, 30), (1100, 800, 22), (900, 400, 18))  # dark blobs: lesions for the segmentation
SUBFIELDS = {"central", "outside"} | {f"{r}_{s}" for r in ("inner", "outer")
                                     for s in ("superior", "nasal", "inferior", "temporal")}


def serve(server, photos: list[bytes]) -> list[tuple[dict, np.ndarray]]:
    result = infer(make_client(server, "grpc"), "grpc", photos, outputs=(c.MASK, c.LESIONS))
    out = []
    for mask, report in zip(result.as_numpy(c.MASK).reshape(-1), result.as_numpy(c.LESIONS).reshape(-1)):
        out.append((json.loads(report), cv2.imdecode(np.frombuffer(mask, np.uint8), cv2.IMREAD_GRAYSCALE)))
    return out


def zones_by_hand(report: dict, x: float, y: float) -> tuple[str, str]:
    """(retinal quadrant, ETDRS subfield) of the point, from the report's fovea, disc and scale alone (photos
    stored upright: EXIF orientation 1)."""
    f, d = report["fovea"]["center"], report["optic_disc"]["center"]
    um_per_px = 1800.0 / report["optic_disc"]["diameter_px"]
    ax, ay = d["x"] - f["x"], d["y"] - f["y"]
    length = math.hypot(ax, ay)
    ax, ay = ax / length, ay / length  # towards the disc: nasal
    sx, sy = (ay, -ax) if -ax < 0 else (-ay, ax)  # the perpendicular pointing up the photo (y decreasing)
    px, py = x - f["x"], y - f["y"]
    nasal, superior = px * ax + py * ay, px * sx + py * sy
    quadrant = ("supero" if superior >= 0 else "infero") + ("nasal" if nasal >= 0 else "temporal")
    r = math.hypot(px, py) * um_per_px
    if r <= 500:
        return quadrant, "central"
    if r > 3000:
        return quadrant, "outside"
    if abs(superior) >= abs(nasal):
        sector = "superior" if superior >= 0 else "inferior"
    else:
        sector = "nasal" if nasal > 0 else "temporal"
    return quadrant, ("inner_" if r <= 1500 else "outer_") + sector


def test_schema_2_on_real_photos_agrees_with_itself(triton_server, sample_bytes):
    for i, (report, mask) in enumerate(serve(triton_server, sample_bytes)):
        assert report["status"] == "ok" and report["schema_version"] == "2.0"
        # The 1.0 fields are all still there.
        for key in ("image", "field_of_view", "model", "threshold", "min_lesion_area_px", "lesions", "totals",
                    "quadrants"):
            assert key in report, key
        disc, fovea, scale = report["optic_disc"], report["fovea"], report["scale"]
        assert disc and fovea and scale, report["anatomy_reasons"]  # the IDRiD samples show both landmarks
        assert 0 < disc["confidence"] <= 1 and 0 < fovea["confidence"] <= 1 and fovea["method"] == "detected"
        assert scale["disc_diameter_px"] == disc["diameter_px"] and scale["disc_diameter_um"] == 1800
        assert scale["um_per_px"] == pytest.approx(1800 / disc["diameter_px"], abs=1e-4)
        assert report["eye"]["laterality"] == ("right" if disc["center"]["x"] > fovea["center"]["x"] else "left")
        dd, lesions = disc["diameter_px"], report["lesions"]
        count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
        assert count - 1 == len(lesions) > 0
        boxes = {tuple(s[:5]): k for k, s in enumerate(stats.tolist()) if k}
        fx, fy = fovea["center"]["x"], fovea["center"]["y"]
        for les in lesions:
            b = les["bbox"]
            k = boxes[(b["x"], b["y"], b["width"], b["height"], les["area_px"])]  # this lesion's pixels
            ys, xs = np.nonzero(labels[b["y"]:b["y"] + b["height"], b["x"]:b["x"] + b["width"]] == k)
            nearest = float(np.sqrt((xs + b["x"] - fx) ** 2 + (ys + b["y"] - fy) ** 2).min())
            assert les["distance_to_fovea_dd"] == pytest.approx(nearest / dd, abs=1.5e-3), (i, les["id"])
            assert les["distance_to_fovea_um"] == pytest.approx(nearest * 1800 / dd, abs=0.2), (i, les["id"])
            assert les["area_mm2"] == pytest.approx(les["area_px"] * (1.8 / dd) ** 2, rel=1e-3, abs=1e-6)
            quadrant, subfield = zones_by_hand(report, les["centroid"]["x"], les["centroid"]["y"])
            assert (les["retinal_quadrant"], les["etdrs_subfield"]) == (quadrant, subfield), (i, les["id"])
        for table, names, key in ((report["retinal_quadrants"], QUADRANTS, "retinal_quadrant"),
                                  (report["etdrs"], SUBFIELDS, "etdrs_subfield")):
            assert set(table) == names
            assert sum(z["count"] for z in table.values()) == len(lesions) == report["totals"]["count"]
            assert sum(z["area_px"] for z in table.values()) == report["totals"]["area_px"]
            for name, zone in table.items():
                assert zone["count"] == sum(les[key] == name for les in lesions)
        findings = report["findings"]
        near = [les["id"] for les in lesions if les["distance_to_fovea_dd"] <= 1.0]
        assert findings["lesions_within_1dd_of_fovea"] == {"count": len(near), "ids": near}
        per_quadrant = [z["count"] for z in report["retinal_quadrants"].values()]
        assert findings["quadrants_with_hemorrhage"] == sum(n > 0 for n in per_quadrant)
        assert findings["quadrants_with_20_or_more"] == sum(n >= 20 for n in per_quadrant)
        assert findings["rule_4_2_1_hemorrhage_criterion_met"] == all(n >= 20 for n in per_quadrant)
        assert "not a diagnosis" in findings["note"]


def test_no_visible_disc_gives_null_anatomy_with_reasons_not_an_error(triton_server, sample_bytes):
    [(report, mask), (neighbour, _)] = serve(triton_server, [encode(no_disc_fundus(BLOBS), ".png"), sample_bytes[0]])
    assert report["status"] == "ok" and report["schema_version"] == "2.0"
    assert report["optic_disc"] is None and report["scale"] is None
    assert report["anatomy_reasons"]["optic_disc"] and report["anatomy_reasons"]["retinal_frame"]
    assert report["eye"] == {"laterality": "unknown", "method": None}
    assert report["retinal_quadrants"] is None and report["etdrs"] is None and report["findings"] is None
    assert report["totals"]["count"] == len(report["lesions"]) > 0  # the rest of the report is as before
    assert report["totals"]["area_px"] == int(np.count_nonzero(mask))
    for les in report["lesions"]:
        assert all(les[key] is None for key in ANATOMICAL), les
    assert neighbour["optic_disc"] is not None  # one photo's missing disc does not touch its neighbour's
