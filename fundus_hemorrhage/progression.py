"""The change report between two visits of one eye: which haemorrhages are new, resolved, enlarged, shrunk or
unchanged, per ETDRS subfield and retinal quadrant, and the change in the 4-2-1 haemorrhage criterion and in the
lesions within 1 disc diameter of the fovea. Documented in the README ("Progression between visits").

    Visit (lesion report schema 2.0 + mask, each photo as the ensemble answered it) x 2
    + Registration (fundus_hemorrhage.registration: follow-up pixels -> baseline pixels)
    -> refusal with its reason (unreadable, ungradable, different eyes, no registration, too little overlap)
       or the change report, `change_report`

Matching. Each follow-up lesion's pixels are mapped into the baseline photo; it matches every baseline lesion
within MATCH_TOLERANCE_WORKING_PX working-grid pixels of them (2 working pixels: the model's resolution, the
rule of `min_lesion_area_px`; the registration error measured is far below it). Matches are joined into groups
(a lesion that split or merged is one group). A group with lesions at both visits is `enlarged` when its area
(both measured in baseline pixels: the follow-up's through the transform's local area scale) grew by at least
AREA_CHANGE (x 2) and by at least 2 min-lesion areas, `shrunk` by the converse, else `unchanged`; a follow-up
lesion matching none is `new`, a baseline lesion matching none `resolved`. Only lesions whose centre lies in the
overlapping field (inside both fields of view, in a margin of OVERLAP_MARGIN) are compared; the others are
counted as outside the comparison. Hysteresis against segmentation flicker: an unmatched lesion is `new`
(`resolved`) only when the other visit's probability under it stays below UNCERTAIN_FRACTION of that visit's
threshold, else it is `uncertain` (the other visit shows it just under threshold). Summary counts: `new`,
`resolved` and `uncertain` are lesions; `enlarged`, `shrunk`, `unchanged` are groups (usually one lesion at each
visit).

AREA_CHANGE = 1.0 (the area doubles, or halves): the area of an unchanged lesion differs between two captures of
one retina by segmentation noise (threshold crossings on the 640 working grid at the lesion's rim, colour and focus
of the capture). On the 54 synthetic second visits of fundus_hemorrhage_perf/results/registration-eval.md, of
917 matched groups that truly did not change, 65 % kept their area within x 1.5, 78 % within x 2, 88 % within x 3:
a smaller change cannot be told from the noise, and even x 2 is weak evidence (22 % of unchanged groups exceed it).

Zone tables count each visit's lesions in the overlapping field by that visit's own report (its lesion's
`etdrs_subfield`, `retinal_quadrant`, `area_mm2`), so with a full overlap they equal the single-visit reports'
tables; `change` is follow-up minus baseline. The 4-2-1 criterion is each single-visit report's own finding
(the whole photo). Everything here is pure computation; it never raises for a photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .contract import REPORT_SCHEMA_VERSION
from .overlay import frame_of
from .registration import (DIFFERENT_EYES, MIN_OVERLAP, TOO_LITTLE_OVERLAP, UNGRADABLE, UNREADABLE, Registration,
                           overlap_fraction)
from .retinal_frame import ETDRS_SUBFIELDS, RETINAL_QUADRANTS

CHANGE_SCHEMA_VERSION = "1.0"
AREA_CHANGE = 1.0  # a group's area must at least double (or halve) to count
MIN_AREA_CHANGE_LESIONS = 2.0  # ... and by at least this many min-lesion areas (a speck's growth is noise)
MATCH_TOLERANCE_WORKING_PX = 2.0
# Hysteresis: a lesion without a match is "new" (or "resolved") only when the other visit's probability under it
# stays below this fraction of that visit's threshold; else it is "uncertain" (the other visit shows it just
# under threshold: segmentation flicker, not a change). Chosen on the synthetic pairs (registration-eval.md).
UNCERTAIN_FRACTION = 0.5
# Image evidence: a new lesion must also darken the photo. Its green channel relative to a ring around it
# (a ratio: illumination and colour balance cancel) must be at least this much lower at the follow-up than at
# the same place of the baseline (for a resolved lesion, the converse). The unet's masks differ between two
# captures of one retina (colour, focus, compression), and without this check most "new" lesions on the
# synthetic pairs were such flicker: the baseline photo there is just as dark (registration-eval.md).
MIN_DARKENING = 0.04
RING_PX = (2, 6)  # the ring around a lesion, pixels at 1/4 resolution: from 2 to 6 beyond its outline
OVERLAP_MARGIN = 0.02  # of the field's radius: a lesion cut by either field's edge is not compared
TRUSTED_CONFIDENCE = 0.5
CHANGES = ("new", "resolved", "enlarged", "shrunk", "unchanged")
UNCERTAIN = "uncertain"
VISITS = ("baseline", "follow_up")


@dataclass
class Visit:
    """One photo's answer: its lesion report (schema 2.0, or an error report), its MASK, uint8 [H, W] (0 / 255;
    None when the photo has no mask) and its PROBABILITY, uint8 [H, W] round(255 p) (None: not asked; then no
    lesion is called uncertain)."""
    report: dict
    mask: np.ndarray | None
    probability: np.ndarray | None = None

    @classmethod
    def from_png(cls, report: dict, mask_png: bytes, probability_png: bytes = b"") -> "Visit":
        decode = lambda png: cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE) if png else None  # noqa: E731
        return cls(report, decode(mask_png), decode(probability_png))

    def faint_level(self) -> int:
        """The uint8 probability level below which this visit shows no sign of a lesion: UNCERTAIN_FRACTION of
        its own threshold."""
        return int(math.ceil(255.0 * UNCERTAIN_FRACTION * float(self.report.get("threshold") or 0.5)))

    def max_probability_at(self, points: np.ndarray) -> int | None:
        """Highest uint8 probability at the pixels nearest to `points` [K, 2] (this photo's pixels) inside the
        photo; None without a probability map or when none lies inside."""
        if self.probability is None or len(points) == 0:
            return None
        h, w = self.probability.shape
        ij = np.rint(points).astype(int)
        ok = (ij[:, 0] >= 0) & (ij[:, 1] >= 0) & (ij[:, 0] < w) & (ij[:, 1] < h)
        return int(self.probability[ij[ok, 1], ij[ok, 0]].max()) if ok.any() else None

    @property
    def status(self) -> str:
        return str(self.report.get("status", "error"))

    def fov(self) -> tuple[float, float, float]:
        f = self.report["field_of_view"]
        return f["center"]["x"], f["center"]["y"], f["radius"]

    def size(self) -> tuple[int, int]:
        return self.report["image"]["width"], self.report["image"]["height"]

    def working_px(self) -> float:
        """One working-grid pixel in this photo's pixels (the grid spans the field's diameter)."""
        from .contract import WORKING_SIZE
        return 2.0 * self.fov()[2] / WORKING_SIZE


def lateralities_differ(baseline: Visit, follow_up: Visit) -> bool:
    eyes = [(v.report.get("eye") or {}).get("laterality", "unknown") for v in (baseline, follow_up)]
    return "unknown" not in eyes and eyes[0] != eyes[1]


def trusted(registration: Registration) -> bool:
    """A registration that overrides a laterality disagreement: the vessel pattern is one eye's own, so a
    confident fit (confidence >= TRUSTED_CONFIDENCE) means the same eye, and the laterality of one photo was
    misjudged (on a disc-centred photo it rests on the disc's side alone)."""
    return registration.ok and registration.confidence >= TRUSTED_CONFIDENCE


def refusal(registration: Registration, baseline: Visit, follow_up: Visit) -> tuple[str, str] | None:
    """(status, reason) when the pair cannot be compared, else None; in this order: unreadable, ungradable,
    different eyes (both lateralities known and different, unless the registration is `trusted`), no
    registration, too little overlap."""
    for name, visit in zip(("baseline", "follow-up"), (baseline, follow_up)):
        if visit.status == "error" or visit.mask is None and visit.status == "ok":
            return UNREADABLE, f"{name} photo: {visit.report.get('error') or 'no mask'}"
    for name, visit in zip(("baseline", "follow-up"), (baseline, follow_up)):
        if visit.status != "ok":
            reasons = ", ".join((visit.report.get("image_quality") or {}).get("reasons") or ["?"])
            return UNGRADABLE, f"{name} photo is ungradable: {reasons}"
    if lateralities_differ(baseline, follow_up) and not trusted(registration):
        eyes = [v.report["eye"]["laterality"] for v in (baseline, follow_up)]
        return DIFFERENT_EYES, f"different eyes: the baseline is a {eyes[0]} eye, the follow-up a {eyes[1]} eye"
    if not registration.ok:
        return registration.status, registration.reason or "registration failed"
    fraction = registration.overlap_fraction
    if fraction is not None and fraction < MIN_OVERLAP:
        return TOO_LITTLE_OVERLAP, (f"too little overlap: the follow-up shows {fraction:.0%} of the baseline's "
                                    f"field of view (at least {MIN_OVERLAP:.0%} needed)")
    return None


def _components(mask: np.ndarray, report: dict) -> tuple[np.ndarray, dict[int, dict]]:
    """(labels int32 [H, W], label -> the report's lesion entry), components matched to the report's lesions by
    bounding box and area (the report's lesions are the mask's 8-connected components)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8,
                                                                ltype=cv2.CV_32S)
    by_box = {(les["bbox"]["x"], les["bbox"]["y"], les["bbox"]["width"], les["bbox"]["height"], les["area_px"]): les
              for les in report.get("lesions") or []}
    entries = {}
    for k in range(1, count):
        key = tuple(int(v) for v in stats[k])
        if key in by_box:
            entries[k] = by_box[key]
    return labels, entries


class _Overlap:
    """Whether a baseline point lies in the compared field: inside the baseline's field and, through the inverse
    transform, inside the follow-up's, each shrunk by OVERLAP_MARGIN."""

    def __init__(self, registration: Registration, baseline: Visit, follow_up: Visit):
        self.inverse = registration.inverse
        self.b, self.f = baseline.fov(), follow_up.fov()
        self.bsize, self.fsize = baseline.size(), follow_up.size()

    @staticmethod
    def _inside(p: np.ndarray, fov, size) -> np.ndarray:
        cx, cy, r = fov
        r *= 1.0 - OVERLAP_MARGIN
        return (((p[:, 0] - cx) ** 2 + (p[:, 1] - cy) ** 2) <= r * r) & (p[:, 0] >= 0) & (p[:, 1] >= 0) \
            & (p[:, 0] < size[0]) & (p[:, 1] < size[1])

    def __call__(self, points) -> np.ndarray:
        p = np.asarray(points, np.float64).reshape(-1, 2)
        return self._inside(p, self.b, self.bsize) & self._inside(self.inverse.apply(p), self.f, self.fsize)


def relative_darkness(photo, points: np.ndarray) -> float | None:
    """Median green of the pixels `points` [K, 2] (the photo's original pixels) over the median green of a ring
    around them (RING_PX), on the photo's 1/4-resolution green channel (registration.PhotoFeatures); None
    without it or when the lesion leaves the photo."""
    if photo is None or photo.green is None or len(points) == 0:
        return None
    q = np.rint(photo.to_reduced(points)).astype(int)
    h, w = photo.green.shape
    pad = RING_PX[1] + 1
    x0, y0 = q.min(axis=0) - pad
    x1, y1 = q.max(axis=0) + pad + 1
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        return None
    inside = np.zeros((y1 - y0, x1 - x0), np.uint8)
    inside[q[:, 1] - y0, q[:, 0] - x0] = 1
    grow = lambda r: cv2.dilate(inside, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))  # noqa: E731
    ring = (grow(RING_PX[1]) > 0) & (grow(RING_PX[0]) == 0)
    crop = photo.green[y0:y1, x0:x1]
    background = float(np.median(crop[ring])) if ring.any() else 0.0
    return float(np.median(crop[inside > 0])) / background if background > 0 else None


def _pixels(labels: np.ndarray, lesion: dict, k: int) -> np.ndarray:
    """[K, 2] (x, y) photo pixels of component `k` (the report's `lesion`)."""
    b = lesion["bbox"]
    ys, xs = np.nonzero(labels[b["y"]:b["y"] + b["height"], b["x"]:b["x"] + b["width"]] == k)
    return np.c_[xs + b["x"], ys + b["y"]].astype(np.float64)


def _map_follow_up_lesions(labels: np.ndarray, entries: dict[int, dict], registration: Registration):
    """label -> (mapped pixel coordinates [K, 2] in baseline pixels, centroid there, area in baseline pixels)."""
    out = {}
    t = registration.transform
    for k, les in entries.items():
        mapped = t.apply(_pixels(labels, les, k))
        centre = t.apply([[les["centroid"]["x"], les["centroid"]["y"]]])[0]
        area = float(les["area_px"] * t.jacobian_determinant([[les["centroid"]["x"], les["centroid"]["y"]]])[0])
        out[k] = (mapped, centre, area)
    return out


def _matches(mapped: np.ndarray, baseline_labels: np.ndarray, tolerance: float) -> set[int]:
    """Baseline labels within `tolerance` pixels of any mapped follow-up pixel."""
    h, w = baseline_labels.shape
    t = int(math.ceil(tolerance))
    x0, y0 = np.floor(mapped.min(axis=0)).astype(int) - t - 1
    x1, y1 = np.ceil(mapped.max(axis=0)).astype(int) + t + 2
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x0 >= x1 or y0 >= y1:
        return set()
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    ij = np.rint(mapped).astype(int) - [x0, y0]
    ok = (ij[:, 0] >= 0) & (ij[:, 1] >= 0) & (ij[:, 0] < x1 - x0) & (ij[:, 1] < y1 - y0)
    canvas[ij[ok, 1], ij[ok, 0]] = 1
    canvas = cv2.dilate(canvas, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * t + 1, 2 * t + 1)))
    found = np.unique(baseline_labels[y0:y1, x0:x1][canvas > 0])
    return {int(v) for v in found if v}


def _groups(baseline_ids, follow_up_ids, edges) -> list[tuple[list[int], list[int]]]:
    """Connected components of the match graph: [(baseline labels, follow-up labels)]."""
    parent = {("b", i): ("b", i) for i in baseline_ids} | {("f", j): ("f", j) for j in follow_up_ids}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for j, i in edges:
        parent[find(("f", j))] = find(("b", i))
    groups: dict = {}
    for node in parent:
        groups.setdefault(find(node), ([], []))[0 if node[0] == "b" else 1].append(node[1])
    return [(sorted(b), sorted(f)) for b, f in groups.values()]


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def classify(area_baseline: float, area_follow_up: float, min_lesion_area_px: float) -> str:
    """"enlarged", "shrunk" or "unchanged" for a matched group's areas (both in baseline pixels)."""
    floor = MIN_AREA_CHANGE_LESIONS * max(1.0, min_lesion_area_px)
    if area_follow_up >= (1 + AREA_CHANGE) * area_baseline and area_follow_up - area_baseline >= floor:
        return "enlarged"
    if area_baseline >= (1 + AREA_CHANGE) * area_follow_up and area_baseline - area_follow_up >= floor:
        return "shrunk"
    return "unchanged"


def _zone_table(names, key, visits_lesions) -> dict:
    table = {}
    for zone in names:
        row = {}
        for visit, lesions in zip(VISITS, visits_lesions):
            inside = [les for les in lesions if les[key] == zone]
            row[visit] = {"count": len(inside), "area_mm2": round(sum(les["area_mm2"] for les in inside), 6)}
        row["change"] = {"count": row["follow_up"]["count"] - row["baseline"]["count"],
                         "area_mm2": round(row["follow_up"]["area_mm2"] - row["baseline"]["area_mm2"], 6)}
        table[zone] = row
    return table


def _findings(baseline: Visit, follow_up: Visit, compared: list[list[dict]]) -> dict:
    near = [[les["id"] for les in lesions if les["distance_to_fovea_dd"] is not None
             and les["distance_to_fovea_dd"] <= 1.0] for lesions in compared]
    met = [bool((v.report.get("findings") or {}).get("rule_4_2_1_hemorrhage_criterion_met"))
           for v in (baseline, follow_up)]
    with_20 = [(v.report.get("findings") or {}).get("quadrants_with_20_or_more") for v in (baseline, follow_up)]
    return {
        "lesions_within_1dd_of_fovea": {"baseline": {"count": len(near[0]), "ids": near[0]},
                                        "follow_up": {"count": len(near[1]), "ids": near[1]},
                                        "change": len(near[1]) - len(near[0])},
        "rule_4_2_1_hemorrhage_criterion_met": {"baseline": met[0], "follow_up": met[1],
                                                "changed": met[0] != met[1]},
        "quadrants_with_20_or_more": {"baseline": with_20[0], "follow_up": with_20[1]},
    }


def change_report(baseline: Visit, follow_up: Visit, registration: Registration, pair_index: int = 0) -> dict:
    """The change report of one pair (README, "Progression between visits"). A refused pair gets status
    "refused", `registration.status` the reason code and `registration.reason` the words; no comparison."""
    report = {"schema_version": CHANGE_SCHEMA_VERSION, "lesion_report_schema_version": REPORT_SCHEMA_VERSION,
              "pair_index": pair_index}
    if registration.ok and baseline.status == follow_up.status == "ok":
        registration.overlap_fraction = overlap_fraction(registration, baseline.fov(), follow_up.fov(),
                                                         baseline.size(), follow_up.size())
    why = refusal(registration, baseline, follow_up)
    reg = registration.to_report()
    reg["overlap_fraction"] = None if registration.overlap_fraction is None else round(registration.overlap_fraction, 4)
    if why is not None:
        reg["status"], reg["reason"], reg["transform"] = why[0], why[1], None
        return {**report, "status": "refused", "registration": reg, "summary": None, "lesions": None,
                "etdrs": None, "retinal_quadrants": None, "findings": None}
    if lateralities_differ(baseline, follow_up):
        reg["laterality_note"] = ("the photos' lateralities differ, but the vessel patterns register with confidence "
                                  f"{registration.confidence:.2f}: compared as one eye")
    return {**report, "status": "ok", "registration": reg, **compare(baseline, follow_up, registration)}


def compare(baseline: Visit, follow_up: Visit, registration: Registration) -> dict:
    """The comparison sections of a registered pair: summary, lesions (one entry per change), the zone tables,
    findings and the compared field."""
    in_overlap = _Overlap(registration, baseline, follow_up)
    b_labels, b_entries = _components(baseline.mask, baseline.report)
    f_labels, f_entries = _components(follow_up.mask, follow_up.report)
    mapped = _map_follow_up_lesions(f_labels, f_entries, registration)
    tolerance = MATCH_TOLERANCE_WORKING_PX * baseline.working_px()
    edges = [(j, i) for j, (pixels, _, _) in mapped.items() for i in _matches(pixels, b_labels, tolerance)
             if i in b_entries]
    b_centre = {i: (e["centroid"]["x"], e["centroid"]["y"]) for i, e in b_entries.items()}
    b_in = dict(zip(b_centre, in_overlap(list(b_centre.values())))) if b_centre else {}
    f_in = dict(zip(mapped, in_overlap([m[1] for m in mapped.values()]))) if mapped else {}
    frame = frame_of(baseline.report)
    scale = (frame.um_per_px / 1000.0) ** 2 if frame else None
    min_area = float(baseline.report.get("min_lesion_area_px") or 1)
    summary = dict.fromkeys((*CHANGES, UNCERTAIN), 0)
    entries, outside = [], {"baseline": 0, "follow_up": 0}
    for b_ids, f_ids in _groups(list(b_entries), list(mapped), edges):
        area_b = float(sum(b_entries[i]["area_px"] for i in b_ids))
        area_f = float(sum(mapped[j][2] for j in f_ids))
        if b_ids:
            w = np.array([b_entries[i]["area_px"] for i in b_ids], np.float64)
            centre = (np.array([b_centre[i] for i in b_ids]) * w[:, None]).sum(0) / w.sum()
            inside = any(b_in[i] for i in b_ids)
        else:
            w = np.array([mapped[j][2] for j in f_ids])
            centre = (np.array([mapped[j][1] for j in f_ids]) * w[:, None]).sum(0) / w.sum()
            inside = any(f_in[j] for j in f_ids)
        if not inside:
            outside["baseline"] += len(b_ids)
            outside["follow_up"] += len(f_ids)
            continue
        change = "new" if not b_ids else "resolved" if not f_ids else classify(area_b, area_f, min_area)
        other = darkening = None
        photos = registration.photos or (None, None)
        if change == "new":
            own = np.concatenate([_pixels(f_labels, f_entries[j], j) for j in f_ids])
            there = np.concatenate([mapped[j][0] for j in f_ids])
            other = baseline.max_probability_at(there)
            darkening = _difference(relative_darkness(photos[0], there), relative_darkness(photos[1], own))
        elif change == "resolved":
            own = np.concatenate([_pixels(b_labels, b_entries[i], i) for i in b_ids])
            there = registration.inverse.apply(own)
            other = follow_up.max_probability_at(there)
            darkening = _difference(relative_darkness(photos[1], there), relative_darkness(photos[0], own))
        if change in ("new", "resolved"):
            faint = (baseline if change == "new" else follow_up).faint_level()
            if (other is not None and other >= faint) or (darkening is not None and darkening < MIN_DARKENING):
                change = UNCERTAIN
        summary[change] += len(f_ids) if not b_ids else len(b_ids) if not f_ids else 1
        entries.append({
            "change": change,
            "baseline_ids": [b_entries[i]["id"] for i in b_ids],
            "follow_up_ids": [f_entries[j]["id"] for j in f_ids],
            "centroid_baseline": {"x": round(float(centre[0]), 1), "y": round(float(centre[1]), 1)},
            "area_baseline_px": int(area_b), "area_follow_up_px": int(round(area_f)),
            "area_baseline_mm2": None if scale is None else round(area_b * scale, 6),
            "area_follow_up_mm2": None if scale is None else round(area_f * scale, 6),
            "area_ratio": None if area_b == 0 else round(area_f / area_b, 3),
            "etdrs_subfield": frame.etdrs_subfield(*centre) if frame else None,
            "retinal_quadrant": frame.retinal_quadrant(*centre) if frame else None,
            "distance_to_fovea_dd": round(frame.distance_dd(*centre), 3) if frame else None,
            "other_visit_max_probability": None if other is None else round(other / 255.0, 3),
            "darkening": None if darkening is None else round(darkening, 4),
        })
    entries.sort(key=lambda e: ((*CHANGES, UNCERTAIN).index(e["change"]), e["centroid_baseline"]["y"], e["centroid_baseline"]["x"]))
    compared = [[b_entries[i] for i in b_entries if b_in[i]], [f_entries[j] for j in mapped if f_in[j]]]
    frames = frame is not None and frame_of(follow_up.report) is not None
    return {
        "summary": summary,
        "compared_field": {"overlap_fraction": round(registration.overlap_fraction, 4)
                           if registration.overlap_fraction is not None else None,
                           "of": "the baseline's field of view",
                           "baseline_ids": [les["id"] for les in compared[0]],
                           "follow_up_ids": [les["id"] for les in compared[1]],
                           "lesions_outside": outside},
        "lesions": entries,
        "etdrs": _zone_table(ETDRS_SUBFIELDS, "etdrs_subfield", compared) if frames else None,
        "retinal_quadrants": _zone_table(RETINAL_QUADRANTS, "retinal_quadrant", compared) if frames else None,
        "zones_reason": None if frames else "the zone tables need a retinal frame (optic disc and fovea) at both visits",
        "findings": _findings(baseline, follow_up, compared) if frames else None,
        "units": {"area": "mm2 (disc diameter = 1800 um, baseline's scale)", "distance": "disc diameters (DD)",
                  "coordinates": "baseline photo pixels"},
    }


def error_change_report(pair_index: int | None, reason: str) -> dict:
    """The report of a pair that could not be processed at all (e.g. an internal failure): status "error"."""
    return {"schema_version": CHANGE_SCHEMA_VERSION, "status": "error", "pair_index": pair_index, "error": reason,
            "registration": {"status": "error", "reason": reason, "transform": None}, "summary": None}
