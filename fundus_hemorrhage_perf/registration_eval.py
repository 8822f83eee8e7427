"""Registration and change detection between visits, evaluated on second visits made from real photographs with
known truth (fundus_hemorrhage_perf.synthetic_pairs), with FIRE's protocol (Hernandez-Matas et al. 2017):

    python -m fundus_hemorrhage_perf.registration_eval --photos ../shared/data/idrid_he/images
    python -m fundus_hemorrhage_perf.registration_eval --photos DIR --masks DIR --output NAME --limit 20

Per photo, one second visit: a known warp (homography or quadratic; rotation, scale, shift), the follow-up's own
capture (aperture, illumination, colour, gamma, blur, noise, JPEG; one pair in four from another camera at
0.6-0.8x the resolution), with up to 2 real haemorrhages inpainted out (where a mask `<stem>_HE.png` is found in
--masks) and 3 real lesion patches from other photos blended in. On every third photo also a refusal pair: a
mirrored copy (the other eye's laterality), another photo (a different eye), and a shift leaving too little
overlap. Both photos of a pair are segmented in-process by the served unet version (fundus_hemorrhage.pipeline,
the ensemble's path) and compared by fundus_hemorrhage.visits, as hemorrhage_progression does.

Registration: the error of a pair is the mean distance at 10 control points (FIRE), uniform in the overlap, in
baseline pixels at the photo's own resolution; a refused pair is a failure. Success rate against thresholds
0-25 px and its area under the curve (mAUC in FIRE's tables). Change detection: an added lesion is found when a
"new" entry of the change report lies on it (within 2 working-grid pixels); a "new" entry on no added lesion is
a false new lesion. Results: fundus_hemorrhage_perf/results/<output>.json and .md (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np

from fundus_hemorrhage import registration as reg
from fundus_hemorrhage.contract import SEGMENTATION_MODEL
from fundus_hemorrhage.files import write_atomically
from fundus_hemorrhage.model_config import version_numbers
from fundus_hemorrhage.pipeline import Pipeline
from fundus_hemorrhage.progression import AREA_CHANGE, Visit, change_report
from fundus_hemorrhage_ops.local_server import MODEL_REPOSITORY, REPO_ROOT
from fundus_hemorrhage_perf.common import relative
from fundus_hemorrhage_perf.synthetic_pairs import (Capture, WarpSpec, add_lesion, capture, control_points,
                                                    fit_aperture, lesion_patch, make_transform, remove_lesions, warp_to_follow_up)

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = np.linspace(0, 25, 101)
SUCCESS_PX = 25.0
NEW_LESION_MM2 = 0.01  # the size of an added lesion that must be reported
VISIBLE_CONTRAST = 0.15  # donor lesions: mean green ratio to their background <= 0.85
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def random_visit(rng: np.random.Generator, index: int, width: int = 4288) -> tuple[WarpSpec, Capture]:
    """A second visit's warp and capture: alternating homography / quadratic, every 4th from another camera.
    Shifts up to 4 % of the photo's width, curvature up to 30 px at the corners of a 4288 px photo (scaled)."""
    kind = "quadratic" if index % 2 else "homography"
    spec = WarpSpec(kind, float(rng.uniform(-10, 10)), float(rng.uniform(0.9, 1.1)),
                    tuple(float(v) for v in rng.uniform(-0.08, 0.08, 2) * width * 0.5),
                    tuple(float(v) for v in rng.uniform(-0.03, 0.03, 2)),
                    tuple(float(v) for v in rng.uniform(-30, 30, 6) * width / 4288))
    cap = Capture(tuple(float(v) for v in rng.uniform(0.85, 1.15, 3)), float(rng.uniform(0.8, 1.25)),
                  tuple(float(v) for v in rng.uniform(-0.15, 0.15, 2)), float(rng.uniform(0, 2.0)),
                  float(rng.uniform(0, 3)), int(rng.integers(80, 96)),
                  float(rng.uniform(0.6, 0.8)) if index % 4 == 3 else 1.0)
    return spec, cap


def read_mask(masks: Path | None, stem: str) -> np.ndarray | None:
    for path in ([masks / f"{stem}_HE.png", masks / f"{stem}.png"] if masks else []):
        if path.is_file():
            return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return None


class Donors:
    """Real lesion patches (ratio to their background, mask) from the photos' truth masks, drawn lazily."""

    def __init__(self, photos: list[Path], masks: Path | None, fallback: list[tuple[Path, Path]]):
        self.sources = [(p, masks) for p in photos] if masks else []
        self.fallback = fallback  # samples/*.jpg with *_HE.png when --photos has no masks
        self.cache: dict[str, list] = {}
        self.widths: dict[str, int] = {}

    def patches(self, path: Path, mask: np.ndarray) -> list:
        if path.name not in self.cache:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
            keep = [k for k in range(1, count) if 150 <= stats[k, 4] <= 12000]
            patches = [lesion_patch(image, mask, stats[k], labels, k) for k in keep[:30]]
            # Visible ones: green at least VISIBLE_CONTRAST darker than the background (many IDRiD outlines are
            # faint smudges the unet does not find on the photo they come from either).
            self.widths[path.name] = image.shape[1]
            self.cache[path.name] = [(ratio, own) for ratio, own in patches
                                     if float(ratio[..., 1][own].mean()) <= 1.0 - VISIBLE_CONTRAST][:12]
        return self.cache[path.name]

    def draw(self, rng, exclude: str, n: int, width: int) -> list:
        pool = [(p, read_mask(m, p.stem)) for p, m in self.sources if p.name != exclude] or \
               [(p, cv2.imread(str(m), cv2.IMREAD_GRAYSCALE)) for p, m in self.fallback]
        pool = [(p, m) for p, m in pool if m is not None]
        out = []
        for _ in range(n * 4):
            if len(out) == n or not pool:
                break
            path, mask = pool[int(rng.integers(len(pool)))]
            patches = self.patches(path, mask)
            if patches:
                ratio, own = patches[int(rng.integers(len(patches)))]
                f = width / self.widths[path.name]  # to the target's scale (photo width as its proxy)
                if f != 1.0:
                    size = (max(3, int(round(own.shape[1] * f))), max(3, int(round(own.shape[0] * f))))
                    ratio = cv2.resize(ratio, size, interpolation=cv2.INTER_LINEAR)
                    own = cv2.resize(own.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
                if own.any():
                    out.append((ratio, own))
        return out


def place(rng, scene, truth_mask, patches, report, inverse, follow_up_size, fov_radius_f):
    """Blend `patches` into the scene at free places in the common field, away from the disc and from real
    lesions; returns their truth masks as (x0, y0, bool crop)."""
    fov = report["field_of_view"]
    cx, cy, r = fov["center"]["x"], fov["center"]["y"], fov["radius"]
    disc = (report.get("optic_disc") or {}).get("center")
    dd = (report.get("optic_disc") or {}).get("diameter_px") or 0.23 * r
    busy = cv2.dilate((truth_mask > 0).astype(np.uint8), np.ones((61, 61), np.uint8)) if truth_mask is not None \
        else np.zeros(scene.shape[:2], np.uint8)
    fw, fh = follow_up_size
    out = []
    for ratio, own in patches:
        h, w = own.shape
        for _ in range(100):
            a, d = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.uniform(0, 0.7 ** 2))
            x, y = cx + d * math.cos(a), cy + d * math.sin(a)
            x0, y0 = int(x - w / 2), int(y - h / 2)
            if x0 < 0 or y0 < 0 or x0 + w > scene.shape[1] or y0 + h > scene.shape[0]:
                continue
            if disc and math.hypot(x - disc["x"], y - disc["y"]) < 1.2 * dd:
                continue
            q = inverse.apply([[x, y]])[0]
            if math.hypot(q[0] - fw / 2, q[1] - fh / 2) > 0.8 * fov_radius_f:
                continue
            if busy[y0:y0 + h, x0:x0 + w][own].any():
                continue
            add_lesion(scene, ratio, own, x0, y0)
            busy[max(0, y0 - 30):y0 + h + 30, max(0, x0 - 30):x0 + w + 30] = 1
            out.append((x0, y0, own))
            break
    return out


def hits(entry_centre, truths, tolerance) -> int | None:
    """Index of the truth lesion a change entry's centre lies on (within `tolerance` px), else None."""
    x, y = entry_centre["x"], entry_centre["y"]
    for k, (x0, y0, own) in enumerate(truths):
        h, w = own.shape
        if not (x0 - tolerance <= x < x0 + w + tolerance and y0 - tolerance <= y < y0 + h + tolerance):
            continue
        ys, xs = np.nonzero(own)
        if np.min((xs + x0 - x) ** 2 + (ys + y0 - y) ** 2) <= tolerance ** 2:
            return k
    return None


def fire_summary(errors: list[float]) -> dict:
    e = np.asarray(errors, np.float64)
    success = [(e <= t).mean() for t in THRESHOLDS]
    finite = e[np.isfinite(e)]
    return {"pairs": len(e), "median_px": float(np.median(e)) if len(e) else None,
            "mean_px_of_registered": float(finite.mean()) if len(finite) else None,
            "p95_px": float(np.percentile(e, 95)) if len(e) else None,
            "success_rate_25px": float((e < SUCCESS_PX).mean()) if len(e) else None,
            "auc_0_25px": float(np.trapz(success, THRESHOLDS) / 25.0) if len(e) else None}


def evaluate_pair(pipeline, rng, index, path: Path, masks, donors, tolerance_wp=2.0) -> dict:
    data = path.read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    h, w = image.shape[:2]
    spec, cap = random_visit(rng, index, w)
    size = (int(round(w * cap.size_factor)), int(round(h * cap.size_factor)))
    truth = make_transform(spec, (w, h), size)
    inverse = truth.inverted(size)
    baseline_result = pipeline([data], with_probability=True)[0]
    fov = baseline_result.report.get("field_of_view") or {}
    bfov = (fov["center"]["x"], fov["center"]["y"], fov["radius"]) if fov else (w / 2, h / 2, w / 2)
    cap.aperture = fit_aperture(truth, size, bfov)
    truth_mask = read_mask(masks, path.stem)
    scene = image.copy()
    removed = []
    if truth_mask is not None:
        count, labels, stats, _ = cv2.connectedComponentsWithStats((truth_mask > 0).astype(np.uint8), connectivity=8)
        big = [k for k in range(1, count) if stats[k, 4] >= 300]
        pick = list(rng.choice(big, size=min(2, len(big)), replace=False)) if big else []
        removed = remove_lesions(scene, truth_mask, pick, labels, stats)
    added = place(rng, scene, truth_mask, donors.draw(rng, path.name, 3, w), baseline_result.report, inverse, size,
                  cap.aperture * size[0] / 2)
    warped = warp_to_follow_up(scene, truth, size)
    recaptured = 0
    for recaptured in range(3):  # an ungradable photo is taken again, as in a clinic: milder each time
        follow_bytes = capture(warped, cap, rng)
        follow_result = pipeline([follow_bytes], with_probability=True)[0]
        if follow_result.report.get("status") != "ungradable":
            break
        cap.gains, cap.gamma = tuple(0.5 + 0.5 * g for g in cap.gains), 0.5 + 0.5 * cap.gamma
        cap.gradient, cap.blur_sigma = (cap.gradient[0] / 2, cap.gradient[1] / 2), cap.blur_sigma / 2
    start = time.perf_counter()
    registration = reg.register(data, follow_bytes)
    seconds = time.perf_counter() - start
    report = change_report(Visit.from_png(baseline_result.report, baseline_result.mask_png,
                                          baseline_result.probability_png),
                           Visit.from_png(follow_result.report, follow_result.mask_png,
                                          follow_result.probability_png), registration)
    points = control_points(truth, bfov, size, rng, aperture=cap.aperture)
    ok = report["registration"]["status"] == reg.OK
    error = float(np.linalg.norm(registration.transform.apply(points) - truth.apply(points), axis=1).mean()) \
        if ok and len(points) else math.inf
    scale = (baseline_result.report.get("scale") or {}).get("um_per_px")
    mm2 = (lambda px: px * (scale / 1000.0) ** 2) if scale else (lambda px: None)
    tolerance = tolerance_wp * 2 * bfov[2] / 640
    entries = report.get("lesions") or []
    new = [e for e in entries if e["change"] == "new"]
    found = {hits(e["centroid_baseline"], added, tolerance) for e in new} - {None}
    touched = {hits(e["centroid_baseline"], added, tolerance) for e in entries} - {None}
    false_new = [e for e in new if hits(e["centroid_baseline"], added, tolerance) is None]
    resolved_truth = {hits(e["centroid_baseline"], removed, tolerance) for e in entries if e["change"] == "resolved"}
    baseline_saw = {hits(les["centroid"], removed, tolerance) for les in baseline_result.report.get("lesions") or []}
    calibration = [{"change": e["change"], "true_new": hits(e["centroid_baseline"], added, tolerance) is not None,
                    "other_p": e.get("other_visit_max_probability"), "area_mm2": e["area_follow_up_mm2"],
                    "darkening": e.get("darkening"),
                    "own_p": max(les["max_probability"] for les in follow_result.report["lesions"]
                                 if les["id"] in e["follow_up_ids"]),
                    "radius_baseline": round(math.hypot(e["centroid_baseline"]["x"] - bfov[0],
                                                        e["centroid_baseline"]["y"] - bfov[1]) / bfov[2], 3),
                    "radius_follow_up": round(float(np.hypot(*(inverse.apply([[e["centroid_baseline"]["x"],
                                                                                e["centroid_baseline"]["y"]]])[0]
                                                               - [size[0] / 2, size[1] / 2]))) / (cap.aperture * size[0] / 2), 3)}
                   for e in entries if e["change"] in ("new", "uncertain") and not e["baseline_ids"]]
    reference = real_lesions_found(baseline_result, truth_mask, mm2)
    unchanged_ratios = [e["area_ratio"] for e in entries if e["change"] in ("unchanged", "enlarged", "shrunk")
                        and hits(e["centroid_baseline"], added + removed, tolerance) is None]
    return {
        "photo": path.name, "warp": spec.kind, "recaptured": recaptured, "camera": "other" if cap.size_factor != 1.0 else "same",
        "status": report["registration"]["status"], "reason": report["registration"].get("reason"),
        "model": registration.transform.kind if registration.transform is not None else None,
        "error_px": error, "inliers": registration.inliers, "confidence": registration.confidence,
        "registration_s": round(seconds, 3), "overlap": report["registration"].get("overlap_fraction"),
        "added": [{"area_px": int(own.sum()), "area_mm2": mm2(int(own.sum())), "reported_new": k in found,
                   "segmented": k in touched} for k, (_, _, own) in enumerate(added)],
        "removed_seen_at_baseline": len(baseline_saw - {None}),
        "removed_reported_resolved": len((resolved_truth - {None}) & (baseline_saw - {None})),
        "false_new": len(false_new), "false_new_areas_mm2": [e["area_follow_up_mm2"] for e in false_new],
        "summary": report.get("summary"), "unchanged_area_ratios": unchanged_ratios,
        "unmatched_follow_up": calibration, "real_lesions_found": reference,
    }


def real_lesions_found(result, truth_mask, mm2) -> dict:
    """Reference for the sensitivity: of the photo's own annotated lesions of >= NEW_LESION_MM2, how many the
    unet's mask touches (the baseline photo as it is)."""
    if truth_mask is None or not result.mask_png:
        return {"n": 0, "found": 0}
    mask = cv2.imdecode(np.frombuffer(result.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    count, labels, stats, _ = cv2.connectedComponentsWithStats((truth_mask > 0).astype(np.uint8), connectivity=8)
    big = [k for k in range(1, count) if (mm2(int(stats[k, 4])) or 0) >= NEW_LESION_MM2]
    found = sum(bool(mask[labels == k].any()) for k in big)
    return {"n": len(big), "found": int(found)}


def refusal_pair(pipeline, rng, kind, path: Path, other: Path) -> dict:
    data = path.read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    h, w = image.shape[:2]
    if kind == "mirrored":
        follow = cv2.imencode(".jpg", cv2.flip(image, 1), [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    elif kind == "other_photo":
        follow = other.read_bytes()
    else:  # too little overlap: two narrow fields of the photo (radius 0.55 R), 0.9 R apart: ~10 % shared
        views = []
        for side in (-1, 1):
            keep = np.zeros((h, w), np.uint8)
            cv2.circle(keep, (int(w / 2 + side * 0.45 * 0.89 * w / 2), h // 2), int(0.55 * 0.89 * w / 2), 1, -1)
            views.append(cv2.imencode(".jpg", image * keep[..., None], [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
        data, follow = views
    results = pipeline([data, follow], with_probability=True)
    registration = reg.register(data, follow)
    report = change_report(*(Visit.from_png(r.report, r.mask_png, r.probability_png) for r in results), registration)
    return {"kind": kind, "photo": path.name, "other": other.name if kind == "other_photo" else None,
            "refused": report["status"] == "refused", "status": report["registration"]["status"],
            "reason": report["registration"]["reason"], "inliers": registration.inliers}


def markdown(result: dict) -> str:
    r, c = result["registration"], result["change_detection"]
    lines = [f"# Registration and change detection between visits ({result['pairs']} synthetic second visits)", "",
             f"Photos: `{result['photos']}` ({result['photo_count']}), masks `{result['masks']}`; seed "
             f"{result['seed']}; unet version {result['unet_version']}; {result['machine']}.",
             "Command: `" + result["command"] + "`", "",
             "## Registration (FIRE protocol: mean error at 10 control points per pair, original pixels)", "",
             "| pairs | median px | mean px (registered) | p95 px | success < 25 px | AUC 0-25 px |",
             "|---|---|---|---|---|---|"]
    for name, s in [("all", r["all"]), *r["by_group"].items()]:
        lines.append(f"| {name}: {s['pairs']} | {s['median_px']:.3f} | {s['mean_px_of_registered'] or float('nan'):.3f}"
                     f" | {s['p95_px']:.3f} | {s['success_rate_25px']:.1%} | {s['auc_0_25px']:.3f} |")
    lines += ["", f"Registration time per pair (both photos' keypoints + fit): median {r['seconds_median']:.2f} s, "
              f"max {r['seconds_max']:.2f} s. Failures: {r['failures'] or 'none'}. Follow-ups taken again because "
              f"the quality gate refused the first capture: {r['recaptured']}.", "",
              "## Change detection (through the unet's masks)", "",
              f"- added lesions >= {NEW_LESION_MM2} mm2: {c['added_large']}, reported new {c['added_large_new']} "
              f"(sensitivity {c['sensitivity_large']:.1%}); segmented at all in the follow-up {c['added_large_segmented']}",
              f"- all added lesions: {c['added_all']}, reported new {c['added_all_new']} "
              f"(sensitivity {c['sensitivity_all']:.1%})",
              f"- false new lesions per pair: mean {c['false_new_per_pair']:.2f}, max {c['false_new_max']}, "
              f"pairs with more than 1: {c['pairs_over_1_false_new']} of {result['pairs']}",
              f"- removed (inpainted) lesions the baseline segmentation had found: {c['removed_seen']}, "
              f"reported resolved {c['removed_resolved']}",
              f"- matched lesions that did not change: {c['unchanged_n']}, area ratio within x{1 + AREA_CHANGE:.1f} "
              f"for {c['unchanged_within_threshold']:.1%} (5th-95th percentile {c['unchanged_ratio_p5']:.2f}-"
              f"{c['unchanged_ratio_p95']:.2f})", "",
              "## Refusals", "", "| kind | pairs | refused | statuses |", "|---|---|---|---|"]
    for kind, s in result["refusals"].items():
        lines.append(f"| {kind} | {s['pairs']} | {s['refused']} | {s['statuses']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--masks", type=Path, help="haemorrhage masks <stem>_HE.png (default: DIR/../masks if any)")
    parser.add_argument("--output", default="registration-eval")
    parser.add_argument("--limit", type=int, default=0, help="first N photos only")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--refusal-every", type=int, default=3)
    args = parser.parse_args(argv)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)[: args.limit or None]
    masks = args.masks or (args.photos.parent / "masks" if (args.photos.parent / "masks").is_dir() else None)
    samples = REPO_ROOT / "samples"
    donors = Donors(photos, masks, [(p, p.with_name(p.stem + "_HE.png")) for p in sorted(samples.glob("*[0-9].jpg"))])
    version = version_numbers(MODEL_REPOSITORY / SEGMENTATION_MODEL)[-1]
    pipeline = Pipeline.from_onnx(MODEL_REPOSITORY / SEGMENTATION_MODEL / str(version) / "model.onnx")
    rng = np.random.default_rng(args.seed)
    pairs, refusals = [], []
    start = time.perf_counter()
    for i, path in enumerate(photos):
        pairs.append(evaluate_pair(pipeline, rng, i, path, masks, donors))
        p = pairs[-1]
        print(f"{i + 1}/{len(photos)} {path.name} {p['warp']}/{p['camera']}: {p['status']} {p['error_px']:.2f} px, "
              f"new {sum(a['reported_new'] for a in p['added'])}/{len(p['added'])}, false new {p['false_new']}",
              flush=True)
        if args.refusal_every and i % args.refusal_every == 0:
            for kind in ("mirrored", "other_photo", "too_little_overlap"):
                refusals.append(refusal_pair(pipeline, rng, kind, path, photos[(i + 7) % len(photos)]))
                print(f"  {kind}: {refusals[-1]['status']} ({refusals[-1]['reason']})", flush=True)
    pipeline.close()
    errors = [p["error_px"] for p in pairs]
    groups = {}
    for p in pairs:
        groups.setdefault(f"{p['warp']}, {p['camera']} camera", []).append(p["error_px"])
    added = [a for p in pairs for a in p["added"]]
    large = [a for a in added if a["area_mm2"] is None or a["area_mm2"] >= NEW_LESION_MM2]
    ratios = np.array([x for p in pairs for x in p["unchanged_area_ratios"] if x], np.float64)
    seconds = [p["registration_s"] for p in pairs]
    result = {
        "photos": relative(args.photos), "masks": relative(masks), "photo_count": len(photos), "pairs": len(pairs),
        "seed": args.seed, "unet_version": version, "machine": f"{__import__('os').cpu_count()} CPU cores",
        "command": "python -m fundus_hemorrhage_perf.registration_eval --photos " + str(relative(args.photos)),
        "wall_s": round(time.perf_counter() - start, 1),
        "registration": {"all": fire_summary(errors),
                         "by_group": {k: fire_summary(v) for k, v in sorted(groups.items())},
                         "recaptured": sum(p["recaptured"] > 0 for p in pairs),
                         "seconds_median": float(np.median(seconds)), "seconds_max": float(np.max(seconds)),
                         "failures": [f"{p['photo']}: {p['status']} ({p['reason']})" for p in pairs
                                      if p["status"] != reg.OK]},
        "change_detection": {
            "added_all": len(added), "added_all_new": sum(a["reported_new"] for a in added),
            "sensitivity_all": sum(a["reported_new"] for a in added) / max(1, len(added)),
            "added_large": len(large), "added_large_new": sum(a["reported_new"] for a in large),
            "added_large_segmented": sum(a["segmented"] for a in large),
            "sensitivity_large": sum(a["reported_new"] for a in large) / max(1, len(large)),
            "false_new_per_pair": float(np.mean([p["false_new"] for p in pairs])),
            "false_new_max": int(max(p["false_new"] for p in pairs)),
            "pairs_over_1_false_new": sum(p["false_new"] > 1 for p in pairs),
            "removed_seen": sum(p["removed_seen_at_baseline"] for p in pairs),
            "removed_resolved": sum(p["removed_reported_resolved"] for p in pairs),
            "unchanged_n": int(len(ratios)),
            "unchanged_within_threshold": float(((ratios < 1 + AREA_CHANGE) & (ratios > 1 / (1 + AREA_CHANGE))).mean())
            if len(ratios) else float("nan"),
            "unchanged_ratio_p5": float(np.percentile(ratios, 5)) if len(ratios) else float("nan"),
            "unchanged_ratio_p95": float(np.percentile(ratios, 95)) if len(ratios) else float("nan")},
        "refusals": {kind: {"pairs": sum(r["kind"] == kind for r in refusals),
                            "refused": sum(r["refused"] for r in refusals if r["kind"] == kind),
                            "statuses": dict(sorted({s: sum(r["status"] == s for r in refusals if r["kind"] == kind)
                                                     for s in {r["status"] for r in refusals if r["kind"] == kind}}
                                                    .items()))}
                     for kind in ("mirrored", "other_photo", "too_little_overlap")},
        "pairs_detail": pairs, "refusals_detail": refusals,
    }
    RESULTS.mkdir(exist_ok=True)
    write_atomically(RESULTS / f"{args.output}.json", json.dumps(result, indent=1, default=float))
    write_atomically(RESULTS / f"{args.output}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
