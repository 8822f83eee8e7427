"""Evaluate the optic-disc and fovea detector on photos it never trained or was tuned on; measure its cost.

Test set: the 54 IDRiD segmentation photos at full size (4288 x 2848), through the service's own preprocess:
disc centre and diameter from the exact disc masks, fovea from landmarks.csv (44 photos). True laterality: the
side of the disc relative to the fovea (or, without a fovea, to the field's centre for macula-centred photos,
and read on the photo for the two that are not). Also: the grading hold-out the detector was tuned on (its own split, for reference), and what
the detector says on the unlabeled sets of other cameras (how often it reports a disc and a fovea).

    python -m fundus_hemorrhage_training.evaluate_anatomy            # writes fundus_hemorrhage_perf/results/anatomy-eval.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from fundus_hemorrhage.anatomy import MODEL_PATH, REASONS, AnatomyDetector
from fundus_hemorrhage.contract import WORKING_SIZE
from fundus_hemorrhage.preprocessing import preprocess
from fundus_hemorrhage.retinal_frame import Landmarks

from .anatomy_data import load, photo_rows
from .common import DEFAULT_DATA, REPO_ROOT

OTHER_SETS = ("diaretdb1", "hei_med", "drive", "chase_db1")


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return Path(path).name


# Photos without a fovea in landmarks.csv whose disc is near the field's centre (not macula-centred): laterality
# read on the photo (the fovea, with its reflex, is visible; the vessel arcades bend towards it).
LATERALITY_READ = {"IDRiD_04": "left", "IDRiD_45": "left"}


def _laterality(name: str, disc_x: float, fovea_x: float, fov_cx: float) -> str:
    """True laterality: the disc's side of the fovea; without a fovea, of the field's centre (macula-centred
    photos), or as read on the photo (LATERALITY_READ)."""
    if name in LATERALITY_READ:
        return LATERALITY_READ[name]
    ref = fovea_x if np.isfinite(fovea_x) else fov_cx
    return "right" if disc_x > ref else "left"


def evaluate_full_size(detector: AnatomyDetector, data: Path) -> tuple[list[dict], dict]:
    """Per-photo records and the summary on the 54 IDRiD segmentation photos, in original pixels."""
    records, costs = [], []
    for row in photo_rows(data, "idrid_he"):
        pre = preprocess(Path(row["image"]).read_bytes())
        pixels = pre.pixels[None]
        detector(pixels)  # warm caches: the cost below is the steady state
        t0 = time.perf_counter()
        anatomy = detector.detect(pixels)[0]
        costs.append(time.perf_counter() - t0)
        lm = Landmarks.from_anatomy(anatomy, pre.geometry, WORKING_SIZE)
        (dx, dy), dd = row["disc"], row["disc_diameter"]
        fx, fy = row["fovea"]
        rec = {"id": row["id"], "true_disc": [round(dx, 1), round(dy, 1)], "true_disc_diameter_px": round(dd, 1),
               "true_fovea": [fx, fy] if np.isfinite(fx) else None,
               "true_laterality": _laterality(row["id"], dx, fx, pre.geometry.fov_cx),
               "disc": lm.disc, "disc_diameter_px": lm.disc_diameter_px, "disc_confidence": lm.disc_confidence,
               "disc_reason": lm.disc_reason, "fovea": lm.fovea, "fovea_confidence": lm.fovea_confidence,
               "fovea_reason": lm.fovea_reason, "laterality": lm.laterality}
        if lm.disc:
            rec["disc_error_px"] = round(math.hypot(lm.disc[0] - dx, lm.disc[1] - dy), 1)
            rec["disc_error_dd"] = round(rec["disc_error_px"] / dd, 3)
            rec["disc_diameter_error"] = round(lm.disc_diameter_px / dd - 1.0, 3)
        if lm.fovea and np.isfinite(fx):
            rec["fovea_error_px"] = round(math.hypot(lm.fovea[0] - fx, lm.fovea[1] - fy), 1)
            rec["fovea_error_dd"] = round(rec["fovea_error_px"] / dd, 3)
        records.append(rec)
    return records, summarise(records, costs)


def summarise(records: list[dict], costs: list[float] | None = None) -> dict:
    """Acceptance-style figures: a missing landmark counts as a miss."""
    n = len(records)
    with_fovea = [r for r in records if r["true_fovea"] is not None]
    disc_err = [r["disc_error_dd"] for r in records if "disc_error_dd" in r]
    fovea_err = [r["fovea_error_dd"] for r in with_fovea if "fovea_error_dd" in r]
    out = {
        "photos": n,
        "disc_found": sum(r["disc"] is not None for r in records),
        "disc_within_0.5dd": round(sum(e <= 0.5 for e in disc_err) / n, 4),
        "disc_error_px_median": statistics.median(r["disc_error_px"] for r in records if "disc_error_px" in r),
        "disc_error_px_max": max(r["disc_error_px"] for r in records if "disc_error_px" in r),
        "disc_error_dd_median": round(statistics.median(disc_err), 3),
        "disc_error_dd_max": round(max(disc_err), 3),
        "disc_diameter_abs_rel_error_median": round(statistics.median(
            abs(r["disc_diameter_error"]) for r in records if "disc_diameter_error" in r), 3),
        "laterality_accuracy": round(sum(r["laterality"] == r["true_laterality"] for r in records) / n, 4),
        "laterality_unknown": sum(r["laterality"] == "unknown" for r in records),
        "photos_with_fovea": len(with_fovea),
        "fovea_found": sum(r["fovea"] is not None for r in with_fovea),
        "fovea_within_1dd": round(sum(e <= 1.0 for e in fovea_err) / max(1, len(with_fovea)), 4),
        "fovea_error_px_median": statistics.median(r["fovea_error_px"] for r in with_fovea if "fovea_error_px" in r),
        "fovea_error_dd_median": round(statistics.median(fovea_err), 3),
        "fovea_error_dd_max": round(max(fovea_err), 3),
        "null_reasons": {reason: sum(r["disc_reason"] == reason or r["fovea_reason"] == reason for r in records)
                         for reason in REASONS[1:] if any(reason in (r["disc_reason"], r["fovea_reason"])
                                                          for r in records)},
    }
    if costs:
        out["detector_ms_per_photo_median"] = round(1000 * statistics.median(costs), 2)
        out["detector_ms_per_photo_p90"] = round(1000 * float(np.percentile(costs, 90)), 2)
    return out


def evaluate_holdout(detector: AnatomyDetector) -> dict:
    """The grading photos the training held out (tuning split), on the working grid (errors in working px; a
    disc diameter is ~98 working px on IDRiD photos)."""
    meta = json.loads(MODEL_PATH.with_suffix(".json").read_text())
    data = load("grading")
    idx = np.flatnonzero(np.isin(data["ids"], meta["holdout_ids"]))
    import cv2

    big = np.stack([cv2.resize(p, (WORKING_SIZE, WORKING_SIZE), interpolation=cv2.INTER_LINEAR)
                    for p in data["pixels"][idx]]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    found = detector.detect(big)
    disc_err = [math.hypot(a.disc_x - x, a.disc_y - y) for a, (x, y) in zip(found, data["disc"][idx])]
    fov_err = [math.hypot(a.fovea_x - x, a.fovea_y - y) for a, (x, y) in zip(found, data["fovea"][idx])]
    dd = 98.0
    return {"photos": int(idx.size), "assumed_disc_diameter_working_px": dd,
            "disc_within_0.5dd": round(float(np.mean([e <= 0.5 * dd for e in disc_err])), 4),
            "fovea_within_1dd": round(float(np.mean([e <= dd for e in fov_err])), 4),
            "disc_found": sum(a.has_disc for a in found), "fovea_found": sum(a.has_fovea for a in found),
            "disc_confidence_min": round(min(a.disc_confidence for a in found), 3),
            "fovea_confidence_min": round(min(a.fovea_confidence for a in found), 3)}


def measure_cost(detector: AnatomyDetector, pixels: np.ndarray, repeats: int = 200) -> dict:
    """CPU time (this thread) and wall time per photo of the whole detection and of the graph alone, one
    intra-op thread. CPU time is what a loaded server pays; wall time on a shared machine includes waiting."""
    def timed(fn) -> tuple[float, float]:
        cpu, wall = [], []
        for _ in range(repeats):
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
        return statistics.median(cpu), min(wall)

    detector(pixels)
    total_cpu, total_wall = timed(lambda: detector.detect(pixels))
    graph_cpu, graph_wall = timed(lambda: detector.probabilities(pixels))
    return {"repeats": repeats, "detect_cpu_ms_median": round(1000 * total_cpu, 2),
            "detect_wall_ms_min": round(1000 * total_wall, 2), "graph_cpu_ms_median": round(1000 * graph_cpu, 2),
            "graph_wall_ms_min": round(1000 * graph_wall, 2)}


def evaluate_other_sets(detector: AnatomyDetector, data: Path, per_set: int) -> dict:
    """Unlabeled photos of other cameras: how often a disc and a fovea are reported, and laterality counts."""
    out = {}
    for name in OTHER_SETS:
        files = sorted((data / "fundus_unlabeled" / name).glob("*.jpg"))[:per_set]
        counts = {"photos": len(files), "disc_found": 0, "fovea_found": 0, "right": 0, "left": 0, "unknown": 0}
        for f in files:
            pre = preprocess(f.read_bytes())
            lm = Landmarks.from_anatomy(detector.detect(pre.pixels[None])[0], pre.geometry, WORKING_SIZE)
            counts["disc_found"] += lm.disc is not None
            counts["fovea_found"] += lm.fovea is not None
            counts[lm.laterality] += 1
        out[name] = counts
    return out


def markdown(result: dict) -> str:
    s = result["idrid_he"]
    lines = ["# Optic disc and fovea detector", "",
             f"Model: `{result['model']}`; trained on the IDRiD grading photos only (fundus_hemorrhage_training.train_anatomy).", "",
             "## 54 IDRiD segmentation photos, full size (never trained or tuned on)", "",
             "| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in s.items() if not isinstance(v, dict)]
    lines += ["", f"Null reasons: {s['null_reasons'] or 'none'}", "",
              "## Cost per photo (one ONNX Runtime thread; IDRiD_14)", "", "```",
              json.dumps(result["cost_one_thread"], indent=1), "```", "",
              "## Grading hold-out (the tuning split)", "", "```", json.dumps(result["holdout"], indent=1), "```",
              "", "## Other cameras (unlabeled): landmarks reported", "", "| set | photos | disc | fovea | right | "
              "left | unknown |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['photos']} | {v['disc_found']} | {v['fovea_found']} | {v['right']} | {v['left']} | "
              f"{v['unknown']} |" for k, v in result.get("other_sets", {}).items()]
    lines += ["", "CHASE_DB1 photos are centred on the optic disc with a narrower field: the disc is found, the fovea "
              "mostly lies outside the field or too near its edge and is reported null with its reason; without "
              "a fovea there is no retinal frame (the lesions' anatomical fields are null) and laterality is "
              "\"unknown\" unless the disc lies clearly to one side of the field's centre."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, default=MODEL_PATH)
    parser.add_argument("--other-per-set", type=int, default=40, help="photos per unlabeled set (0: skip)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "fundus_hemorrhage_perf" / "results" / "anatomy-eval")
    args = parser.parse_args()
    detector = AnatomyDetector(args.model, threads=1)
    records, summary = evaluate_full_size(detector, args.data)
    sample = preprocess((REPO_ROOT / "samples" / "IDRiD_14.jpg").read_bytes()).pixels[None]
    result = {"model": _relative(args.model), "idrid_he": summary, "holdout": evaluate_holdout(detector),
              "cost_one_thread": measure_cost(detector, sample)}
    if args.other_per_set:
        result["other_sets"] = evaluate_other_sets(detector, args.data, args.other_per_set)
    result["records"] = records
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
