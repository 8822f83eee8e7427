"""The lesion report (JSON) of one photo: schema `contract.REPORT_SCHEMA_VERSION`, documented in the README.

Schema 2.0 = the 1.0 report (field of view quadrants, lesions in photo pixels) followed by the clinician's frame
(fundus_hemorrhage.retinal_frame): `eye`, `optic_disc`, `fovea`, `scale`, `anatomy_reasons`, per-lesion
`distance_to_fovea_dd/_um`, `area_mm2`, `retinal_quadrant`, `etdrs_subfield`, and the `retinal_quadrants`, `etdrs`
and `findings` tables. The report is a plain dict of top-level sections: a later section is one more key added by
`lesion_report`'s caller or here, without touching the others.

`image_quality` (fundus_hemorrhage.quality's verdict) is part of 2.0: a gradable photo's report has status "ok";
an ungradable one's has status "ungradable", no lesions and zero totals (`ungradable_report`), and its mask is empty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .contract import REPORT_SCHEMA_VERSION, SEGMENTATION_MODEL
from .geometry import Geometry
from .quality import QualityAssessment
from .retinal_frame import Landmarks, anatomy_sections, lesion_anatomy, zone_sections

QUADRANTS = ("upper_left", "upper_right", "lower_left", "lower_right")


def quadrant_of(x: float, y: float, geometry: Geometry) -> str:
    """Quadrant of the FOV as the photo is stored (image axes: up is row 0), split at the FOV centre."""
    return ("upper_" if y < geometry.fov_cy else "lower_") + ("left" if x < geometry.fov_cx else "right")


NOT_ASSESSED = QualityAssessment(True, (), None)  # a caller that ran no gate (e.g. postprocess on its own)
UNGRADABLE_ANATOMY = "not looked for: the photo is ungradable (see image_quality)"


def lesion_report(lesions: list, geometry: Geometry, threshold: float, model_version: str, min_area: int,
                  landmarks: Landmarks | None = None, image_quality: QualityAssessment = NOT_ASSESSED) -> dict:
    """Report of one photo from its `postprocessing.Lesion`s (original pixels), the producing version's `threshold`,
    the photo's `retinal_frame.Landmarks` (disc and fovea in original pixels; None: both unknown, reason given) and
    its image-quality verdict (`image_quality`; for an ungradable photo see `ungradable_report`).

    Each lesion's zone is taken at its reported centroid against the reported disc and fovea, and its distance to
    the fovea from its `fovea_distance_px` (nearest labelled pixel), so the report agrees with itself.
    """
    landmarks = landmarks or Landmarks.unavailable(geometry)
    frame = landmarks.frame()
    fov_area = max(1.0, geometry.fov_area)
    quadrants = {q: {"count": 0, "area_px": 0} for q in QUADRANTS}
    entries = []
    for i, les in enumerate(lesions):
        quadrant = quadrant_of(les.cx, les.cy, geometry)
        quadrants[quadrant]["count"] += 1
        quadrants[quadrant]["area_px"] += les.area
        centroid = (round(les.cx, 1), round(les.cy, 1))
        nearest = les.fovea_distance_px if les.fovea_distance_px is not None else float("nan")
        entries.append({
            "id": i + 1,
            "bbox": {"x": les.x, "y": les.y, "width": les.width, "height": les.height},
            "centroid": {"x": centroid[0], "y": centroid[1]},
            "area_px": les.area,
            "area_fov_fraction": round(les.area / fov_area, 7),
            "mean_probability": round(les.mean_probability, 4),
            "max_probability": round(les.max_probability, 4),
            "quadrant": quadrant,
            **lesion_anatomy(frame, *centroid, les.area, nearest),
        })
    total_area = int(sum(les.area for les in lesions))
    for q in quadrants.values():
        q["area_fov_fraction"] = round(q["area_px"] / fov_area, 7)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "status": "ok" if image_quality.gradable else "ungradable",
        "image_quality": image_quality.to_report(),
        "image": {"width": geometry.width, "height": geometry.height, "exif_orientation": geometry.exif_orientation},
        "field_of_view": {
            "center": {"x": round(geometry.fov_cx, 1), "y": round(geometry.fov_cy, 1)},
            "radius": round(geometry.fov_radius, 1),
            "bbox": {"x": round(geometry.fov_x0), "y": round(geometry.fov_y0),
                     "width": round(geometry.fov_x1 - geometry.fov_x0),
                     "height": round(geometry.fov_y1 - geometry.fov_y0)},
            "area_px": int(round(geometry.fov_area)),
        },
        "model": {"name": SEGMENTATION_MODEL, "version": str(model_version)},
        "threshold": round(float(threshold), 6),  # float32 in the graph: 0.1725 arrives as 0.17249999
        "min_lesion_area_px": min_area,
        "lesions": entries,
        "totals": {"count": len(entries), "area_px": total_area, "area_fov_fraction": round(total_area / fov_area, 7)},
        "quadrants": quadrants,
        **anatomy_sections(landmarks),
        **zone_sections(frame, entries),
    }


def ungradable_report(geometry: Geometry, threshold: float, model_version: str, min_area: int,
                      image_quality: QualityAssessment) -> dict:
    """Report of a photo the quality gate refused: status "ungradable", `image_quality` with the reasons, no
    lesions, zero totals, the image and field of view as usual; the optic disc and fovea null with the reason
    `UNGRADABLE_ANATOMY` (the detector is not run on it)."""
    landmarks = dataclasses.replace(Landmarks.unavailable(geometry), disc_reason=UNGRADABLE_ANATOMY,
                                    fovea_reason=UNGRADABLE_ANATOMY)
    return lesion_report([], geometry, threshold, model_version, min_area, landmarks, image_quality)


def error_report(index: int, reason: str) -> dict:
    """Report of photo `index` that has no result: status "error" and `error`, the reason in one line (no image
    index in it: that is `image_index`). `index` None: a photo of a request that failed as a whole."""
    report = {"schema_version": REPORT_SCHEMA_VERSION, "status": "error", "error": reason}
    if index is not None:
        report["image_index"] = index
    return report


@dataclass
class PhotoResult:
    """One photo's answer, as the ensemble returns it: MASK PNG (8-bit, 255 = haemorrhage, at the photo's size;
    b"" for an error), the LESIONS report (parsed), PROBABILITY PNG (b"" unless asked). `seconds`: its share of the
    round trip of the request that answered it (clients).

    `status` is the report's: "ok" (segmented), "ungradable" (refused by the quality gate: empty mask, never to
    be read as "no lesions") or "error" (no result). `ok` is True for "ok" only, and `error` says why otherwise."""
    mask_png: bytes
    report: dict
    probability_png: bytes = b""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return str(self.report.get("status", "error"))

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.mask_png)

    @property
    def error(self) -> str:
        """"" when ok; else the reason: the report's `error`, or the image-quality reasons of an ungradable photo."""
        if self.status == "ungradable":
            return "ungradable photo: " + ", ".join((self.report.get("image_quality") or {}).get("reasons") or ["?"])
        if self.status != "ok":
            return str(self.report.get("error") or "the server reported an error")
        return "" if self.mask_png else "the server returned no mask"
