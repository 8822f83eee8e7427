"""The clinician's frame on synthetic geometry: laterality, quadrants, ETDRS rings and sectors, the ruler, findings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fundus_hemorrhage.anatomy import FOUND, NO_FOVEA, OUTSIDE, REASONS, Anatomy
from fundus_hemorrhage.geometry import Geometry
from fundus_hemorrhage.retinal_frame import (ETDRS_SUBFIELDS, RETINAL_QUADRANTS, Landmarks, RetinalFrame,
                                             anatomy_sections, displayed_direction, laterality_from_disc,
                                             lesion_anatomy, nearest_pixel_distance, zone_sections)

# Fovea at (1000, 1000), disc diameter 180 px: 10 um per px, ETDRS radii 50, 150 and 300 px.
F = (1000.0, 1000.0)
DD = 180.0


def right_eye(**kw) -> RetinalFrame:
    return RetinalFrame(*F, 1450.0, 1000.0, DD, **kw)  # disc on the photo's right


def left_eye(**kw) -> RetinalFrame:
    return RetinalFrame(*F, 550.0, 1000.0, DD, **kw)


def test_laterality_and_axes():
    r, l_ = right_eye(), left_eye()
    assert r.laterality == "right" and l_.laterality == "left"
    assert r.nasal == (1.0, 0.0) and l_.nasal == (-1.0, 0.0)
    assert r.superior == pytest.approx((0.0, -1.0)) and l_.superior == pytest.approx((0.0, -1.0))  # up
    assert r.um_per_px == pytest.approx(10.0)


@pytest.mark.parametrize("frame, nasal_sign", [(right_eye(), 1), (left_eye(), -1)])
def test_quadrant_boundaries_each_side(frame, nasal_sign):
    x = lambda n: F[0] + nasal_sign * n  # noqa: E731  (n > 0: towards the disc)
    # Superior/inferior boundary: the fovea-disc line (y = 1000), on both the nasal and temporal sides.
    assert frame.retinal_quadrant(x(200), 999.5) == "superonasal"
    assert frame.retinal_quadrant(x(200), 1000.5) == "inferonasal"
    assert frame.retinal_quadrant(x(-200), 999.5) == "superotemporal"
    assert frame.retinal_quadrant(x(-200), 1000.5) == "inferotemporal"
    # Nasal/temporal boundary: the perpendicular through the fovea, above and below the axis.
    assert frame.retinal_quadrant(x(0.5), 800) == "superonasal"
    assert frame.retinal_quadrant(x(-0.5), 800) == "superotemporal"
    assert frame.retinal_quadrant(x(0.5), 1200) == "inferonasal"
    assert frame.retinal_quadrant(x(-0.5), 1200) == "inferotemporal"
    # Exactly on a boundary: superior, respectively nasal.
    assert frame.retinal_quadrant(x(200), 1000) == "superonasal"
    assert frame.retinal_quadrant(x(0), 1200) == "inferonasal"


def test_rotated_axis():
    # The disc 20 degrees below the horizontal on the right: the frame turns with it.
    a = math.radians(20)
    nasal = (math.cos(a), math.sin(a))
    frame = RetinalFrame(*F, F[0] + 450 * nasal[0], F[1] + 450 * nasal[1], DD)
    sup = frame.superior
    assert sup == pytest.approx((math.sin(a), -math.cos(a)))  # perpendicular, pointing up
    assert frame.laterality == "right"

    def at(n: float, s: float) -> tuple[float, float]:
        return F[0] + n * nasal[0] + s * sup[0], F[1] + n * nasal[1] + s * sup[1]

    # A point 100 px along the rotated superior axis, slightly nasal, which the unrotated split calls inferior.
    x, y = at(100, 5)
    assert y > F[1] - 40 and frame.retinal_quadrant(x, y) == "superonasal"
    assert frame.retinal_quadrant(*at(100, -5)) == "inferonasal"
    assert frame.retinal_quadrant(*at(-5, 100)) == "superotemporal"
    assert frame.retinal_quadrant(*at(5, -100)) == "inferonasal"
    # Point just below the image horizontal through the fovea on the nasal side is superior in this frame.
    assert frame.retinal_quadrant(F[0] + 200, F[1] + 10) == "superonasal"
    assert frame.etdrs_subfield(*at(0, 100)) == "inner_superior"
    assert frame.etdrs_subfield(*at(-200, 10)) == "outer_temporal"


@pytest.mark.parametrize("frame, nasal_sign", [(right_eye(), 1), (left_eye(), -1)])
def test_etdrs_rings_and_sectors(frame, nasal_sign):
    x = lambda n: F[0] + nasal_sign * n  # noqa: E731
    # Exactly on a ring belongs to the inner zone; just past it to the next.
    assert frame.etdrs_subfield(x(50), 1000) == "central"
    assert frame.etdrs_subfield(x(50.01), 1000) == "inner_nasal"
    assert frame.etdrs_subfield(x(150), 1000) == "inner_nasal"
    assert frame.etdrs_subfield(x(150.01), 1000) == "outer_nasal"
    assert frame.etdrs_subfield(x(300), 1000) == "outer_nasal"
    assert frame.etdrs_subfield(x(300.01), 1000) == "outside"
    assert frame.etdrs_subfield(F[0], 1000 - 50) == "central"  # on the 500 um circle, straight up
    # Sectors: 90-degree wedges centred on superior, nasal, inferior, temporal; the diagonal goes to sup/inf.
    assert frame.etdrs_subfield(x(-100), 1000) == "inner_temporal"
    assert frame.etdrs_subfield(F[0], 900) == "inner_superior"
    assert frame.etdrs_subfield(F[0], 1100) == "inner_inferior"
    assert frame.etdrs_subfield(x(70), 1000 - 69) == "inner_nasal"
    assert frame.etdrs_subfield(x(70), 1000 - 71) == "inner_superior"
    assert frame.etdrs_subfield(x(70), 1000 - 70) == "inner_superior"  # exactly diagonal
    assert frame.etdrs_subfield(x(-200), 1000 + 199) == "outer_temporal"
    assert frame.etdrs_subfield(x(-200), 1000 + 201) == "outer_inferior"


def test_exif_orientation_turns_the_frame():
    # Stored upside down (EXIF 3: displayed rotated 180 degrees): the disc stored on the left is on the right.
    frame = RetinalFrame(*F, 550.0, 1000.0, DD, exif_orientation=3)
    assert frame.laterality == "right"
    assert frame.superior == pytest.approx((0.0, 1.0))  # the displayed top is the stored bottom
    assert frame.retinal_quadrant(900, 1100) == "superonasal"
    # Mirrored (EXIF 2): the disc stored on the right is displayed on the left.
    assert RetinalFrame(*F, 1450.0, 1000.0, DD, exif_orientation=2).laterality == "left"
    # Rotated 90 degrees clockwise for display (EXIF 6): stored "down" is displayed "left".
    assert displayed_direction(0, 1, 6) == (-1, 0)
    assert RetinalFrame(*F, 1000.0, 550.0, DD, exif_orientation=6).laterality == "right"


def test_ruler_and_distance():
    frame = right_eye()
    assert frame.distance_dd(F[0] + 180, F[1]) == pytest.approx(1.0)
    assert frame.area_mm2(10_000) == pytest.approx(1.0)  # 100 x 100 px of 10 um = 1 mm^2
    with pytest.raises(ValueError):
        RetinalFrame(*F, *F, DD)
    with pytest.raises(ValueError):
        RetinalFrame(*F, 1450.0, 1000.0, 0.0)


def test_nearest_pixel_distance():
    comp = np.zeros((10, 10), bool)
    comp[2:5, 3:8] = True  # photo pixels x 103..107, y 52..54
    assert nearest_pixel_distance(comp, 100, 50, 110.0, 53.0) == pytest.approx(3.0)
    assert nearest_pixel_distance(comp, 100, 50, 105.2, 53.1) == 0.0  # inside the lesion
    assert nearest_pixel_distance(comp, 100, 50, 100.0, 50.0) == pytest.approx(math.hypot(3, 2))
    with pytest.raises(ValueError):
        nearest_pixel_distance(np.zeros((3, 3), bool), 0, 0, 0.0, 0.0)


def _lesions(frame, points):
    out = []
    for i, (x, y) in enumerate(points):
        out.append({"id": i + 1, "area_px": 4, **lesion_anatomy(frame, x, y, 4, frame.distance_px(x, y))})
    return out


def test_zones_add_up_and_4_2_1_criterion():
    frame = right_eye()
    quadrant_points = {"superonasal": (1100, 900), "superotemporal": (900, 900), "inferonasal": (1100, 1100),
                       "inferotemporal": (900, 1100)}
    points = [p for p in quadrant_points.values() for _ in range(20)] + [(1010, 1000)]
    lesions = _lesions(frame, points)
    zones = zone_sections(frame, lesions)
    assert sum(q["count"] for q in zones["retinal_quadrants"].values()) == len(lesions)
    assert sum(z["count"] for z in zones["etdrs"].values()) == len(lesions)
    assert set(zones["etdrs"]) == set(ETDRS_SUBFIELDS) and set(zones["retinal_quadrants"]) == set(RETINAL_QUADRANTS)
    assert zones["retinal_quadrants"]["superonasal"] == {"count": 21, "area_px": 84, "area_mm2": 0.0084}
    f = zones["findings"]
    assert f["quadrants_with_hemorrhage"] == 4 and f["quadrants_with_20_or_more"] == 4
    assert f["rule_4_2_1_hemorrhage_criterion_met"] is True
    assert f["lesions_within_1dd_of_fovea"] == {"count": 81, "ids": list(range(1, 82))}
    # 19 in one quadrant: not met.
    f = zone_sections(frame, _lesions(frame, points[1:80]))["findings"]
    assert f["quadrants_with_20_or_more"] == 3 and f["rule_4_2_1_hemorrhage_criterion_met"] is False
    assert "not met" in f["summary"] and "not a diagnosis" in f["note"]


def test_lesion_fields():
    frame = right_eye()
    fields = lesion_anatomy(frame, 1000, 1200, 400, 190.0)
    assert fields == {"distance_to_fovea_dd": round(190 / 180, 3), "distance_to_fovea_um": 1900.0,
                      "area_mm2": 0.04, "retinal_quadrant": "inferonasal", "etdrs_subfield": "outer_inferior"}
    assert set(lesion_anatomy(None, 1, 1, 1, 1.0).values()) == {None}
    assert zone_sections(None, []) == {"retinal_quadrants": None, "etdrs": None, "findings": None}


GEOMETRY = Geometry(4288, 2848, 500.0, -300.0, 3200.0, 2100.0, 1300.0, 1600.0, 500.0, 0.0, 3700.0, 2848.0,
                    7.0e6)


def test_landmarks_from_anatomy_map_to_the_photo():
    s = 3200.0 / 640
    a = Anatomy(500.0, 320.0, 98.0, 0.9, FOUND, 250.0, 340.0, 0.8, FOUND)
    lm = Landmarks.from_anatomy(a, GEOMETRY, 640)
    assert lm.disc == (round(500 + 500.5 * s - 0.5, 1), round(-300 + 320.5 * s - 0.5, 1))
    assert lm.disc_diameter_px == pytest.approx(98 * s)
    assert lm.laterality == "right"
    sections = anatomy_sections(lm)
    assert sections["eye"] == {"laterality": "right", "method": "disc_fovea_axis"}
    assert sections["optic_disc"]["center"] == {"x": lm.disc[0], "y": lm.disc[1]}
    assert sections["fovea"]["method"] == "detected"
    assert sections["scale"]["um_per_px"] == pytest.approx(1800 / (98 * s), abs=1e-4)
    assert sections["anatomy_reasons"] == {"optic_disc": None, "fovea": None, "retinal_frame": None}


def test_missing_landmarks_are_null_with_reasons():
    nan = math.nan
    no_fovea = Anatomy(500.0, 320.0, 98.0, 0.9, FOUND, nan, nan, 0.1, NO_FOVEA)
    lm = Landmarks.from_anatomy(no_fovea, GEOMETRY, 640)
    assert lm.frame() is None and lm.fovea is None
    sections = anatomy_sections(lm)
    assert sections["fovea"] is None and sections["scale"] is None
    assert sections["anatomy_reasons"]["fovea"] == REASONS[NO_FOVEA]
    # The disc alone, far right of the field's centre: a right eye's macula-centred photo.
    assert sections["eye"] == {"laterality": "right", "method": "disc_side"}
    nothing = Anatomy(nan, nan, nan, 0.05, OUTSIDE, nan, nan, 0.1, NO_FOVEA)
    sections = anatomy_sections(Landmarks.from_anatomy(nothing, GEOMETRY, 640))
    assert sections["optic_disc"] is None and sections["eye"] == {"laterality": "unknown", "method": None}
    assert sections["anatomy_reasons"]["optic_disc"] == REASONS[OUTSIDE]


def test_laterality_from_disc_alone_needs_an_offset():
    assert laterality_from_disc(2000, 2100, 450) == "unknown"  # a disc-centred photo
    assert laterality_from_disc(900, 2100, 450) == "left"
    assert laterality_from_disc(3300, 2100, 450) == "right"
