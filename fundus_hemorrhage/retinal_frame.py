"""The clinician's frame on a fundus photo: laterality, the disc-diameter ruler, retinal quadrants, ETDRS grid.

Pure geometry on original-photo pixels (x right, y down, as stored):

- Axes. `nasal` is the unit vector from the fovea towards the disc centre; `superior` is perpendicular to it,
  pointing to the top of the photo as displayed (fundus cameras give an upright, unmirrored image: superior
  retina at the top). EXIF orientation is reported, not applied, by preprocess, so directions are taken to the
  displayed orientation before deciding "top" and "right".
- Laterality. The disc lies nasal to the fovea: on the displayed photo's right for a right eye.
- Ruler. One disc diameter (DD) = DISC_DIAMETER_UM = 1800 um, the population mean disc diameter; micrometres
  and mm^2 are therefore approximations (real discs range ~1.5-2.2 mm, and the photo's magnification varies
  with the eye's refraction; distortion near the field's edge is ignored).
- Retinal quadrants: the line through the fovea and the disc centre splits superior from inferior; its
  perpendicular through the fovea splits nasal (the disc's side) from temporal. A point exactly on a boundary
  belongs to the superior, respectively nasal, side.
- ETDRS grid (ETDRS report 10, Early Treatment Diabetic Retinopathy Study Research Group, Ophthalmology
  98(5 Suppl):786-806, 1991): circles of radius 500, 1500 and 3000 um around the fovea; the inner and outer rings are cut into 90 deg
  sectors centred on the superior, nasal, inferior and temporal directions. A point exactly on a circle belongs
  to the inner zone; one exactly on a sector's diagonal boundary to the superior or inferior sector.

Findings are decision support, not a diagnosis: they count what the segmentation found in one photo, which
shows only part of each quadrant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .anatomy_tensor import REASONS, Anatomy
from .geometry import Geometry

DISC_DIAMETER_UM = 1800.0
ETDRS_RADII_UM = (500.0, 1500.0, 3000.0)
RETINAL_QUADRANTS = ("superotemporal", "superonasal", "inferotemporal", "inferonasal")
SECTORS = ("superior", "nasal", "inferior", "temporal")
ETDRS_SUBFIELDS = ("central",) + tuple(f"{ring}_{s}" for ring in ("inner", "outer") for s in SECTORS) + ("outside",)
LATERALITIES = ("right", "left", "unknown")
# The 4-2-1 rule for severe non-proliferative diabetic retinopathy (ETDRS report 12, Ophthalmology
# 98(5 Suppl):823-833, 1991; International Clinical DR scale, Wilkinson et al., Ophthalmology 110:1677, 2003):
# its haemorrhage criterion is 20 or more intraretinal haemorrhages in each of the 4 quadrants (the wording of
# issue 13; the International scale says "more than 20").
HAEMORRHAGES_PER_QUADRANT_4_2_1 = 20
# Without a fovea, the disc alone gives laterality only when it is this far (DD) from the field's centre
# sideways: a macula-centred photo has the disc ~2.5 DD from its centre, a disc-centred one near 0.
DISC_OFFSET_FOR_LATERALITY_DD = 1.5

# EXIF orientation -> 2x2 matrix taking a stored-pixel direction (dx, dy) to the displayed photo's direction.
_EXIF_DIRECTION = {
    1: ((1, 0), (0, 1)), 2: ((-1, 0), (0, 1)), 3: ((-1, 0), (0, -1)), 4: ((1, 0), (0, -1)),
    5: ((0, 1), (1, 0)), 6: ((0, -1), (1, 0)), 7: ((0, -1), (-1, 0)), 8: ((0, 1), (-1, 0)),
}


def displayed_direction(dx: float, dy: float, exif_orientation: int = 1) -> tuple[float, float]:
    """A direction in stored pixels (x right, y down) as it points on the photo displayed per its EXIF tag."""
    (a, b), (c, d) = _EXIF_DIRECTION.get(int(exif_orientation), _EXIF_DIRECTION[1])
    return a * dx + b * dy, c * dx + d * dy


def _stored_direction(dx: float, dy: float, exif_orientation: int = 1) -> tuple[float, float]:
    m = np.array(_EXIF_DIRECTION.get(int(exif_orientation), _EXIF_DIRECTION[1]), dtype=np.float64)
    return tuple(np.linalg.solve(m, [dx, dy]).tolist())


def laterality_from_disc(disc_x: float, fov_cx: float, disc_diameter_px: float, exif_orientation: int = 1) -> str:
    """"right", "left" or "unknown" from the disc alone: its side of the field's centre when it lies at least
    DISC_OFFSET_FOR_LATERALITY_DD away sideways (a macula-centred photo), else "unknown"."""
    dx, _ = displayed_direction(disc_x - fov_cx, 0.0, exif_orientation)
    if abs(dx) < DISC_OFFSET_FOR_LATERALITY_DD * disc_diameter_px:
        return "unknown"
    return "right" if dx > 0 else "left"


@dataclass(frozen=True)
class RetinalFrame:
    """Fovea and disc centres (original pixels), disc diameter (original pixels), EXIF orientation.

    Raises ValueError when the disc diameter is not positive or the two centres coincide.
    """

    fovea_x: float
    fovea_y: float
    disc_x: float
    disc_y: float
    disc_diameter_px: float
    exif_orientation: int = 1

    def __post_init__(self):
        if not self.disc_diameter_px > 0:
            raise ValueError(f"disc diameter must be positive, got {self.disc_diameter_px}")
        if math.hypot(self.disc_x - self.fovea_x, self.disc_y - self.fovea_y) == 0:
            raise ValueError("the fovea and the disc centre coincide: no axis")

    @property
    def nasal(self) -> tuple[float, float]:
        """Unit vector (stored pixels) from the fovea towards the disc centre."""
        dx, dy = self.disc_x - self.fovea_x, self.disc_y - self.fovea_y
        n = math.hypot(dx, dy)
        return dx / n, dy / n

    @property
    def superior(self) -> tuple[float, float]:
        """Unit vector (stored pixels) perpendicular to `nasal`, towards the displayed photo's top."""
        nx, ny = self.nasal
        dnx, dny = displayed_direction(nx, ny, self.exif_orientation)
        # Of the two perpendiculars on the displayed photo, the one pointing up (negative y); for a vertical
        # fovea-disc axis (never anatomical) the one pointing left.
        px, py = dny, -dnx
        if py > 0 or (py == 0 and px > 0):
            px, py = -px, -py
        return _stored_direction(px, py, self.exif_orientation)

    @property
    def laterality(self) -> str:
        """"right" when the disc is on the displayed photo's right of the fovea, else "left"."""
        dx, _ = displayed_direction(self.disc_x - self.fovea_x, self.disc_y - self.fovea_y, self.exif_orientation)
        return "right" if dx > 0 else "left"

    @property
    def um_per_px(self) -> float:
        return DISC_DIAMETER_UM / self.disc_diameter_px

    def coordinates(self, x: float, y: float) -> tuple[float, float]:
        """(nasal, superior) components, original pixels, of the point's offset from the fovea."""
        (nx, ny), (sx, sy) = self.nasal, self.superior
        dx, dy = x - self.fovea_x, y - self.fovea_y
        return dx * nx + dy * ny, dx * sx + dy * sy

    def distance_px(self, x: float, y: float) -> float:
        return math.hypot(x - self.fovea_x, y - self.fovea_y)

    def distance_dd(self, x: float, y: float) -> float:
        return self.distance_px(x, y) / self.disc_diameter_px

    def retinal_quadrant(self, x: float, y: float) -> str:
        n, s = self.coordinates(x, y)
        return ("supero" if s >= 0 else "infero") + ("nasal" if n >= 0 else "temporal")

    def etdrs_subfield(self, x: float, y: float) -> str:
        r_um = self.distance_px(x, y) * self.um_per_px
        if r_um <= ETDRS_RADII_UM[0]:
            return "central"
        if r_um > ETDRS_RADII_UM[2]:
            return "outside"
        ring = "inner" if r_um <= ETDRS_RADII_UM[1] else "outer"
        n, s = self.coordinates(x, y)
        sector = ("superior" if s >= 0 else "inferior") if abs(s) >= abs(n) else ("nasal" if n > 0 else "temporal")
        return f"{ring}_{sector}"

    def ring_radius_px(self, radius_um: float) -> float:
        return radius_um / self.um_per_px

    def area_mm2(self, area_px: float) -> float:
        return area_px * (self.um_per_px / 1000.0) ** 2


def nearest_pixel_distance(component: np.ndarray, x0: int, y0: int, x: float, y: float) -> float:
    """Distance (pixels) from the point (x, y) to the nearest pixel centre of a component.

    component: bool [h, w], the lesion's pixels in the window whose top-left pixel is (x0, y0) on the photo.
    0 when the point lies in one of the component's pixels. Raises ValueError for an empty component.
    """
    ys, xs = np.nonzero(component)
    if xs.size == 0:
        raise ValueError("empty component")
    px, py = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))  # the pixel holding the point
    if 0 <= py - y0 < component.shape[0] and 0 <= px - x0 < component.shape[1] and component[py - y0, px - x0]:
        return 0.0
    return float(np.sqrt(((xs + x0 - x) ** 2 + (ys + y0 - y) ** 2).min()))


@dataclass(frozen=True)
class Landmarks:
    """A photo's disc and fovea in original pixels, rounded to 0.1 px as reported (the zones are computed from
    the reported values, so a reader can recompute every lesion's zone from the report alone).

    A missing landmark has centre None and a reason; `disc_diameter_px` is None exactly when the disc is.
    """

    disc: tuple[float, float] | None
    disc_diameter_px: float | None
    disc_confidence: float
    disc_reason: str | None
    fovea: tuple[float, float] | None
    fovea_confidence: float
    fovea_reason: str | None
    fov_cx: float
    exif_orientation: int = 1

    @classmethod
    def from_anatomy(cls, anatomy: Anatomy, geometry: Geometry, working_size: int) -> "Landmarks":
        """From an `anatomy.Anatomy` on the working grid and the photo's `Geometry`."""
        m = geometry.working_to_original(working_size)
        to_photo = lambda x, y: tuple(round(float(v), 1) for v in m @ [x, y, 1.0])  # noqa: E731
        disc = to_photo(anatomy.disc_x, anatomy.disc_y) if anatomy.has_disc else None
        fovea = to_photo(anatomy.fovea_x, anatomy.fovea_y) if anatomy.has_fovea else None
        return cls(disc, round(anatomy.disc_diameter * m[0, 0], 1) if disc else None,
                   round(float(anatomy.disc_confidence), 3), None if disc else REASONS[anatomy.disc_reason],
                   fovea, round(float(anatomy.fovea_confidence), 3), None if fovea else REASONS[anatomy.fovea_reason],
                   geometry.fov_cx, geometry.exif_orientation)

    @classmethod
    def unavailable(cls, geometry: Geometry) -> "Landmarks":
        """Neither landmark: the detector did not run (reason "detector not available")."""
        return cls.from_anatomy(Anatomy.unavailable(), geometry, 1)

    def frame(self) -> RetinalFrame | None:
        """The retinal frame, or None unless both the disc and the fovea were found."""
        if self.disc is None or self.fovea is None or (self.disc == self.fovea):
            return None
        return RetinalFrame(*self.fovea, *self.disc, self.disc_diameter_px, self.exif_orientation)

    @property
    def laterality(self) -> str:
        frame = self.frame()
        if frame is not None:
            return frame.laterality
        if self.disc is not None:
            return laterality_from_disc(self.disc[0], self.fov_cx, self.disc_diameter_px, self.exif_orientation)
        return "unknown"


FRAME_NEEDS = "the retinal frame needs both the optic disc and the fovea"
NOTE = ("Decision support, not a diagnosis: counts of what the segmentation found in this photo, which shows only "
        "part of each retinal quadrant; distances and areas assume a disc diameter of 1800 um.")


def _point(p: tuple[float, float]) -> dict:
    return {"x": p[0], "y": p[1]}


def anatomy_sections(landmarks: Landmarks) -> dict:
    """The report's `eye`, `optic_disc`, `fovea`, `scale` and `anatomy_reasons` sections (schema 2.0)."""
    frame = landmarks.frame()
    reasons = {"optic_disc": landmarks.disc_reason, "fovea": landmarks.fovea_reason,
               "retinal_frame": None if frame else FRAME_NEEDS}
    return {
        "eye": {"laterality": landmarks.laterality,
                "method": "disc_fovea_axis" if frame else ("disc_side" if landmarks.laterality != "unknown"
                                                           else None)},
        "optic_disc": None if landmarks.disc is None else {
            "center": _point(landmarks.disc), "diameter_px": landmarks.disc_diameter_px,
            "confidence": landmarks.disc_confidence},
        "fovea": None if landmarks.fovea is None else {
            "center": _point(landmarks.fovea), "confidence": landmarks.fovea_confidence, "method": "detected"},
        "scale": None if frame is None else {
            "disc_diameter_px": frame.disc_diameter_px, "disc_diameter_um": DISC_DIAMETER_UM,
            "um_per_px": round(frame.um_per_px, 4), "assumption": "disc diameter = 1800 um (population mean)"},
        "anatomy_reasons": reasons,
    }


def lesion_anatomy(frame: RetinalFrame | None, cx: float, cy: float, area_px: int, nearest_px: float) -> dict:
    """One lesion's anatomical fields from its centroid (cx, cy), area and the distance (pixels) from the fovea
    to its nearest pixel (`nearest_pixel_distance`); all None without a frame."""
    if frame is None:
        return dict.fromkeys(("distance_to_fovea_dd", "distance_to_fovea_um", "area_mm2", "retinal_quadrant",
                              "etdrs_subfield"))
    return {
        "distance_to_fovea_dd": round(nearest_px / frame.disc_diameter_px, 3),
        "distance_to_fovea_um": round(nearest_px * frame.um_per_px, 1),
        "area_mm2": round(frame.area_mm2(area_px), 6),
        "retinal_quadrant": frame.retinal_quadrant(cx, cy),
        "etdrs_subfield": frame.etdrs_subfield(cx, cy),
    }


def zone_sections(frame: RetinalFrame | None, lesions: list[dict]) -> dict:
    """The report's `retinal_quadrants`, `etdrs` and `findings` from the lesions' entries (each with `id`,
    `area_px` and the `lesion_anatomy` fields); all None without a frame. Zone counts add up to len(lesions)."""
    if frame is None:
        return {"retinal_quadrants": None, "etdrs": None, "findings": None}

    def zones(names: tuple[str, ...], key: str) -> dict:
        out = {z: {"count": 0, "area_px": 0} for z in names}
        for les in lesions:
            out[les[key]]["count"] += 1
            out[les[key]]["area_px"] += int(les["area_px"])
        for z in out.values():
            z["area_mm2"] = round(frame.area_mm2(z["area_px"]), 6)
        return out

    quadrants = zones(RETINAL_QUADRANTS, "retinal_quadrant")
    near = [les["id"] for les in lesions if les["distance_to_fovea_dd"] <= 1.0]
    with_any = sum(q["count"] > 0 for q in quadrants.values())
    with_20 = sum(q["count"] >= HAEMORRHAGES_PER_QUADRANT_4_2_1 for q in quadrants.values())
    met = with_20 == len(RETINAL_QUADRANTS)
    return {
        "retinal_quadrants": quadrants,
        "etdrs": zones(ETDRS_SUBFIELDS, "etdrs_subfield"),
        "findings": {
            "lesions_within_1dd_of_fovea": {"count": len(near), "ids": near},
            "quadrants_with_hemorrhage": with_any,
            "quadrants_with_20_or_more": with_20,
            "rule_4_2_1_hemorrhage_criterion_met": met,
            "summary": (f"{len(near)} lesion(s) within 1 disc diameter of the fovea; haemorrhages in {with_any} of 4 "
                        f"retinal quadrants, 20 or more in {with_20}. The haemorrhage criterion of the 4-2-1 rule "
                        f"for severe non-proliferative retinopathy (20 or more in each of the 4 quadrants) is "
                        f"{'met' if met else 'not met'} in this photo."),
            "note": NOTE,
        },
    }
