"""Measure the image-quality gate (fundus_hemorrhage/quality.py) on real photos and their degraded copies.

For every photo (default: the 54 IDRiD photos in ../shared/data/idrid_he/images when present, else samples/) and
every degradation in `DEGRADATIONS` (applied at the photo's full size, then encoded as the JPEG a camera would
write), through the in-process serving path (`Pipeline.from_onnx`, the same masks as the ensemble):
  - the gate's metrics and verdict on the decoded, reduced image (as preprocess sees it), and its cost in ms;
  - the served mask's Dice against the normal photo's served mask (1.0 when both are empty), without the gate;
  - the same through the serving path with the gate (`gated_pipeline`: the gate and its brightness normalisation
    in `preprocess_decoded`; --policy picks which photos are normalised, every-photo is the service's), against
    what that path serves for the normal photo;
  - for exposure degradations, every copy normalised to the typical brightness (the experiment's arm).
Records are kept (--records) so the verdicts can be recomputed for new thresholds without the model (--reuse;
--remeasure also measures the gate again). --other-photos DIR: the gate alone on DIR/*/*.jpg (other cameras),
counting false rejections. The normal photos are also served normalised, and with IDRiD's masks/ beside images/
their Dice with the annotation is recorded, as served and normalised.

    .venv/bin/python fundus_hemorrhage_perf/quality_eval.py --dice-stride 3 --other-photos ../shared/data/fundus_unlabeled \
        --out fundus_hemorrhage_perf/results/quality-gate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from fundus_hemorrhage import quality
from fundus_hemorrhage.pipeline import Pipeline
from fundus_hemorrhage.preprocessing import (ImageError, PreprocessConfig, decode_with_jpeg_quality, find_field_of_view,
                                            preprocess)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO_ROOT.parent / "shared" / "data" / "idrid_he" / "images"
DEFAULT_MODEL = REPO_ROOT / "model_repository" / "unet" / "2" / "model.onnx"
CAMERA_WIDTH = 4288  # blur sigmas are given at the IDRiD camera's width and scaled to the photo's
CAMERA_QUALITY = 95


def _scale(k: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda bgr: cv2.convertScaleAbs(bgr, alpha=k)  # saturates at 255: over-exposure clips


def _gamma(g: float) -> Callable[[np.ndarray], np.ndarray]:
    lut = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** g), 0, 255).astype(np.uint8)
    return lambda bgr: cv2.LUT(bgr, lut)


def _blur(sigma: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda bgr: cv2.GaussianBlur(bgr, (0, 0), sigma * bgr.shape[1] / CAMERA_WIDTH)


def _haze(bgr: np.ndarray) -> np.ndarray:
    """Washed out: half the contrast, lifted towards grey (a flare / dirty-lens look)."""
    return cv2.convertScaleAbs(bgr, alpha=0.5, beta=100)


def _grey(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


def _red_free_grey(bgr: np.ndarray) -> np.ndarray:
    return cv2.merge([bgr[..., 1]] * 3)


def _red_free_green(bgr: np.ndarray) -> np.ndarray:
    z = np.zeros_like(bgr[..., 1])
    return cv2.merge([z, bgr[..., 1], z])


def _red_free_tinted(bgr: np.ndarray) -> np.ndarray:
    """Green channel shown green-tinted, as some viewers do: (0.3 G, G, 0.3 G)."""
    g = bgr[..., 1]
    t = cv2.convertScaleAbs(g, alpha=0.3)
    return cv2.merge([t, g, t])


# name -> (transform of the full-size BGR photo, JPEG quality it is written at)
DEGRADATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]] = {
    "brightness_0.15": (_scale(0.15), CAMERA_QUALITY),
    "brightness_0.25": (_scale(0.25), CAMERA_QUALITY),
    "brightness_0.4": (_scale(0.4), CAMERA_QUALITY),
    "brightness_0.6": (_scale(0.6), CAMERA_QUALITY),
    "gamma_2.2": (_gamma(2.2), CAMERA_QUALITY),  # darker mid-tones
    "gamma_0.45": (_gamma(0.45), CAMERA_QUALITY),  # lifted mid-tones
    "overexposed_1.8": (_scale(1.8), CAMERA_QUALITY),
    "overexposed_2.5": (_scale(2.5), CAMERA_QUALITY),
    "washed_out": (_haze, CAMERA_QUALITY),
    "blur_2": (_blur(2.0), CAMERA_QUALITY),
    "blur_4": (_blur(4.0), CAMERA_QUALITY),
    "blur_8": (_blur(8.0), CAMERA_QUALITY),
    "jpeg_q25": (lambda bgr: bgr, 25),
    "jpeg_q10": (lambda bgr: bgr, 10),
    "grayscale": (_grey, CAMERA_QUALITY),
    "red_free_grey": (_red_free_grey, CAMERA_QUALITY),
    "red_free_green": (_red_free_green, CAMERA_QUALITY),
    "red_free_tinted": (_red_free_tinted, CAMERA_QUALITY),
}
# Where brightness normalisation is tried as well (served photos only).
NORMALISED_ARM = ("brightness_0.15", "brightness_0.25", "brightness_0.4", "brightness_0.6", "gamma_2.2",
                  "gamma_0.45", "overexposed_1.8", "overexposed_2.5", "washed_out")


POLICIES = {"outside-range": quality.QualityThresholds(), "every-photo": quality.NORMALISE_EVERY_PHOTO}


def degrade(bgr: np.ndarray, name: str) -> bytes:
    transform, jpeg_quality = DEGRADATIONS[name]
    ok, buf = cv2.imencode(".jpg", transform(bgr), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    assert ok
    return buf.tobytes()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing found in either)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def mask_of(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED) > 0


_INF = float("inf")
# No gate at all: nothing refused, nothing normalised (the service before the gate).
UNGATED = quality.QualityThresholds(
    min_brightness=-_INF, normalise_below=-_INF, normalise_above=_INF, max_red_green_ratio=_INF,
    max_brightness=_INF, min_saturation_colour=-_INF, washed_contrast=-_INF, min_contrast=-_INF,
    min_shadow_ratio=-_INF, min_red_green_ratio=-_INF, min_fine_to_mid=-_INF, min_jpeg_quality=-_INF)
# No gate, every photo normalised to the typical brightness (the experiment's arm).
UNGATED_NORMALISED = dataclasses.replace(UNGATED, normalise_below=_INF, dark_target=quality.TYPICAL_BRIGHTNESS)


def gated_pipeline(model: Path, thresholds: quality.QualityThresholds = quality.SERVING_THRESHOLDS) -> Pipeline:
    """The serving path (`Pipeline`, the ensemble's masks) with the gate's limits and exposure policy set to
    `thresholds`: `quality.SERVING_THRESHOLDS` is the service; UNGATED the service before the gate."""
    return Pipeline.from_onnx(model, preprocess_config=PreprocessConfig(quality_thresholds=thresholds))


def gate(data: bytes, config: PreprocessConfig = PreprocessConfig()) -> dict:
    """The gate's metrics on the decoded, reduced photo, and the time they took (decode and FOV not included); the
    JPEG quality is the one serving reads from the header (`decode_with_jpeg_quality`; None for other formats)."""
    try:
        bgr, _, _, jpeg_quality = decode_with_jpeg_quality(data, config)
        fov = find_field_of_view(bgr, config.min_fov_fraction, config.min_fov_texture)
    except ImageError as exc:
        return {"preprocess_error": str(exc)}
    start = time.perf_counter()
    metrics = quality.measure(bgr, fov)
    ms = (time.perf_counter() - start) * 1e3
    jpeg_quality = None if jpeg_quality is None else round(jpeg_quality, 1)
    return {"metrics": quality.metrics_dict(metrics), "jpeg_quality": jpeg_quality, "gate_ms": round(ms, 2)}


def serve(pipeline: Pipeline, data: bytes) -> tuple[np.ndarray | None, str | None]:
    """The served mask, or None and the reason: the photo refused (unreadable) or reported ungradable."""
    try:
        result = pipeline([data])[0]
    except ImageError as exc:
        return None, str(exc)
    if result.report["status"] == "ungradable":
        return None, "ungradable: " + ", ".join(result.report["image_quality"]["reasons"])
    return (mask_of(result.mask_png), None) if result.ok else (None, result.report.get("error"))


def measure_photo(name: str, data: bytes, pipeline: Pipeline, normalising: Pipeline, gated: Pipeline,
                  degradations: list[str], truth: np.ndarray | None = None, serve_degraded: bool = True) -> dict:
    """One photo's record: the gate on it and on each degraded copy; the normal photo served as it is and
    normalised (with their Dice against `truth`, the annotation, when given); with `serve_degraded`, each copy
    served too, and its mask's Dice against the normal photo's."""
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    record = {"photo": name, **gate(data), "degraded": {}}
    normal, error = serve(pipeline, data)
    assert normal is not None, f"{name}: the normal photo is not served: {error}"
    normalised, _ = serve(normalising, data)
    record["dice_normalised"] = round(dice(normalised, normal), 4)
    if serve_degraded:
        record["mask_px"] = int(normal.sum())
        gated_normal, _ = serve(gated, data)  # the reference for the gated copies: what the service serves for it
        if gated_normal is None:
            gated_normal = normal
    if truth is not None and normal.shape == truth.shape:  # accuracy, with and without normalisation
        record.update(dice_truth=round(dice(normal, truth), 4), dice_truth_normalised=round(dice(normalised, truth), 4))
    for d in degradations:
        degraded = degrade(full, d)
        entry = gate(degraded)
        if serve_degraded:
            mask, error = serve(pipeline, degraded)
            entry.update({"served_error": error} if mask is None else
                         {"dice": round(dice(mask, normal), 4), "mask_px": int(mask.sum())})
            gated_mask, gated_error = serve(gated, degraded)  # what the gated service serves
            entry.update({"gated_error": gated_error} if gated_mask is None else
                         {"dice_gated": round(dice(gated_mask, gated_normal), 4),
                          "gated_gain": round(verdict_of(entry, gated.preprocess_config.quality_thresholds)
                                                     .exposure_gain, 4)})
            if d in NORMALISED_ARM and mask is not None:
                mask_n, _ = serve(normalising, degraded)
                if mask_n is not None:
                    entry["dice_normalised"] = round(dice(mask_n, normal), 4)
        record["degraded"][d] = entry
    return record


def remeasure(records: list[dict], folder: Path) -> None:
    """The gate measured again (new metrics) on each recorded photo and its copies; Dice entries are kept."""
    for r in records:
        data = (folder / r["photo"]).read_bytes()
        r.update(gate(data))
        full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        for d, entry in r["degraded"].items():
            entry.update(gate(degrade(full, d)))
        print(f"remeasured {r['photo']}", flush=True)


def verdict_of(entry: dict, thresholds: quality.QualityThresholds) -> quality.QualityAssessment:
    if "metrics" not in entry:  # preprocess refused the photo (no field of view): refused with its reason
        return quality.QualityAssessment(False, (entry["preprocess_error"],), None)
    return quality.judge(quality.QualityMetrics(**entry["metrics"]), entry.get("jpeg_quality"), thresholds)


def served_dice(entry: dict, v: quality.QualityAssessment) -> float | None:
    """Dice of the mask the gated service would serve (normalised when the gate says so); None if not served.
    Measured through the gated path when the thresholds are the recorded ones; else inferred from the arms."""
    if "dice" not in entry:
        return None
    if "dice_gated" in entry and v.gradable and round(v.exposure_gain, 4) == entry["gated_gain"]:
        return entry["dice_gated"]
    return entry.get("dice_normalised", entry["dice"]) if v.exposure_gain != 1.0 else entry["dice"]


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = np.asarray(values)
    return {"n": len(v), "min": round(float(v.min()), 3), "median": round(float(np.median(v)), 3),
            "below_0.5": int((v < 0.5).sum())}


def summarise(records: list[dict], other: dict, thresholds: quality.QualityThresholds) -> dict:
    normal = {r["photo"]: verdict_of(r, thresholds) for r in records}
    served = [r for r in records if "mask_px" in r]
    out = {
        "thresholds": dataclasses.asdict(thresholds),
        "typical_brightness": quality.TYPICAL_BRIGHTNESS,
        "photos": len(records), "photos_served": len(served),
        "normal": {
            "rejected": {k: list(v.reasons) for k, v in normal.items() if not v.gradable},
            "normalised": sorted(k for k, v in normal.items() if v.exposure_gain != 1.0),
            "gate_ms": {"median": round(float(np.median([r["gate_ms"] for r in records])), 1),
                        "p95": round(float(np.percentile([r["gate_ms"] for r in records], 95)), 1)},
            # brightness normalisation applied to every normal photo: how far it moves their masks
            "dice_if_always_normalised": _stats([r["dice_normalised"] for r in records if "dice_normalised" in r]),
        },
        "degraded": {},
        "other_collections": {},
        "normalise_below_alternatives": {},
    }
    truth = [r for r in records if "dice_truth" in r]
    if truth:
        out["normal"]["dice_vs_truth"] = {
            "n": len(truth), "as_served": round(float(np.mean([r["dice_truth"] for r in truth])), 4),
            "if_always_normalised": round(float(np.mean([r["dice_truth_normalised"] for r in truth])), 4)}
    for below in (56.0, 70.0, 80.0, 90.0, 256.0):
        alt = dataclasses.replace(thresholds, normalise_below=below)
        failing = []
        for r in records:
            for d, e in r["degraded"].items():
                v = verdict_of(e, alt)
                score = served_dice(e, v) if v.gradable else None
                if score is not None and score < 0.5:
                    failing.append(f"{r['photo']} {d} {score}")
        changed = [r for r in records if verdict_of(r, alt).exposure_gain != 1.0 and "dice_truth" in r]
        out["normalise_below_alternatives"][str(below)] = {
            "normal_photos_normalised": sum(verdict_of(r, alt).exposure_gain != 1.0 for r in records),
            # their accuracy (mean Dice with the annotation), as served today and normalised
            "their_dice_vs_truth": [round(float(np.mean([r[k] for r in changed])), 4) if changed else None
                                    for k in ("dice_truth", "dice_truth_normalised")],
            "served_degraded_below_dice_0.5": failing}
    for d in DEGRADATIONS:
        entries = [(r, r["degraded"][d]) for r in records if d in r["degraded"]]
        verdicts = [verdict_of(e, thresholds) for _, e in entries]
        reasons: dict[str, int] = {}
        for v in verdicts:
            for reason in v.reasons:
                reasons[reason] = reasons.get(reason, 0) + 1
        gated = [served_dice(e, v) for (_, e), v in zip(entries, verdicts) if v.gradable]
        out["degraded"][d] = {
            "n": len(entries), "rejected_fraction": round(sum(not v.gradable for v in verdicts) / len(entries), 3),
            "reasons": reasons,
            "normalised": sum(v.gradable and v.exposure_gain != 1.0 for v in verdicts),
            "dice_served_if_gradable": _stats([x for x in gated if x is not None]),
            "dice_without_gate": _stats([e["dice"] for _, e in entries if "dice" in e]),
            "dice_always_normalised": _stats([e["dice_normalised"] for _, e in entries if "dice_normalised" in e]),
            "brightness": _stats([e["metrics"]["brightness"] for _, e in entries if "metrics" in e]),
        }
    collections: dict[str, list[quality.QualityAssessment]] = {}
    for name, entry in other.items():
        collections.setdefault(name.split("/")[0], []).append(verdict_of(entry, thresholds))
    for name, verdicts in sorted(collections.items()):
        reasons = {}
        for v in verdicts:
            for reason in v.reasons:
                reasons[reason] = reasons.get(reason, 0) + 1
        out["other_collections"][name] = {"n": len(verdicts), "rejected": sum(not v.gradable for v in verdicts),
                                          "normalised": sum(v.exposure_gain != 1.0 for v in verdicts),
                                          "reasons": reasons}
    return out


def markdown(s: dict) -> str:
    lines = [f"# Image-quality gate: {s['photos']} photos, {s['photos_served']} of them served for Dice", "",
             "Made by fundus_hemorrhage_perf/quality_eval.py. Each degradation is applied to the full-size photo, which is then written "
             "as a JPEG (q95; jpeg_q* at their quality) and judged as preprocess sees it (decoded, reduced). "
             "'Dice served': the mask the gated service would serve (normalised where the gate says so) against "
             "the normal photo's mask, both through the unet v2 ONNX graph in process (the ensemble's masks); "
             "1.0 when both are empty. 'Dice always normalised': every copy normalised to the typical brightness. "
             "Other collections: gate only (no labels), to count false rejections on other cameras.",
             *([f"Note: {s['note']}"] if s.get("note") else []), "",
             f"Normal photos rejected: {len(s['normal']['rejected'])} {s['normal']['rejected'] or ''}; "
             f"normalised: {len(s['normal']['normalised'])}; gate cost {s['normal']['gate_ms']['median']} ms "
             f"median, {s['normal']['gate_ms']['p95']} ms p95 (on the decoded reduced image).",
             f"Normal photos' masks if every photo were normalised to brightness {s['typical_brightness']}: Dice "
             f"{s['normal']['dice_if_always_normalised']}.", "",
             "| degradation | rejected | reasons | normalised | Dice served (gradable only) | Dice without gate |"
             " Dice always normalised | brightness |", "|---|---:|---|---:|---|---|---|---|"]

    def fmt(st: dict) -> str:
        return "-" if not st.get("n") else f"n {st['n']}, min {st['min']}, med {st['median']}, <0.5: {st['below_0.5']}"

    for d, r in s["degraded"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
        b = r["brightness"]
        lines.append(f"| {d} | {r['rejected_fraction']:.0%} | {reasons} | {r['normalised']} | "
                     f"{fmt(r['dice_served_if_gradable'])} | {fmt(r['dice_without_gate'])} | "
                     f"{fmt(r['dice_always_normalised'])} | {b.get('min', '-')}-{b.get('median', '-')} |")
    if "dice_vs_truth" in s["normal"]:
        t = s["normal"]["dice_vs_truth"]
        lines += ["", f"Accuracy on the {t['n']} labelled photos (mean Dice with the IDRiD truth): as served "
                  f"{t['as_served']}, if every photo were normalised {t['if_always_normalised']}."]
    lines += ["", "| normalise below (median luma) | normal photos normalised | their Dice with the truth: as "
              "served -> normalised | served degraded copies with Dice < 0.5 |", "|---:|---:|---|---|"]
    for below, a in s["normalise_below_alternatives"].items():
        before, after = a["their_dice_vs_truth"]
        lines.append(f"| {below} | {a['normal_photos_normalised']} | {before} -> {after} | "
                     f"{len(a['served_degraded_below_dice_0.5'])}: "
                     f"{'; '.join(a['served_degraded_below_dice_0.5'])} |")
    if s["other_collections"]:
        lines += ["", "| other collection (gate only) | photos | rejected | normalised | reasons |",
                  "|---|---:|---:|---:|---|"]
        for name, r in s["other_collections"].items():
            reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
            lines.append(f"| {name} | {r['n']} | {r['rejected']} | {r['normalised']} | {reasons} |")
    return "\n".join(lines) + "\n"


def preprocess_cost(paths: list[Path], repeats: int) -> dict:
    """ms per photo of `preprocess` (decode to model input) with the gate (the service) and without (UNGATED),
    interleaved so that both see the same machine load; medians over `repeats` rounds, per photo."""
    configs = {"gated": PreprocessConfig(), "ungated": PreprocessConfig(quality_thresholds=UNGATED)}
    out = {}
    for path in paths:
        data = path.read_bytes()
        times: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(repeats):
            for name, config in configs.items():
                start = time.perf_counter()
                preprocess(data, config)
                times[name].append((time.perf_counter() - start) * 1e3)
        out[path.name] = {k: round(float(np.median(v)), 1) for k, v in times.items()}
        out[path.name]["extra"] = round(out[path.name]["gated"] - out[path.name]["ungated"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=None, help="folder of photos (default: IDRiD if present)")
    parser.add_argument("--glob", default="*.jpg")
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos")
    parser.add_argument("--dice-stride", type=int, default=1,
                        help="serve (and score Dice on) every Nth photo only; the gate is measured on all")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--records", type=Path, default=Path(tempfile.gettempdir()) / "quality-records.json")
    parser.add_argument("--other-photos", type=Path, default=None,
                        help="folder of collections (DIR/*/*.jpg): the gate only, for false rejections")
    parser.add_argument("--other-records", type=Path,
                        default=Path(tempfile.gettempdir()) / "quality-other-records.json")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="every-photo",
                        help="which photos are normalised: every photo (default: the service's policy) or only "
                             "those outside the IDRiD range")
    parser.add_argument("--note", default="", help="a line on how the records were made, kept in the results")
    parser.add_argument("--remeasure", action="store_true",
                        help="with --reuse: measure the gate again on every photo and copy (keeps the Dice)")
    parser.add_argument("--reuse", action="store_true", help="recompute the verdicts from --records only")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--cost", type=int, default=0, metavar="ROUNDS",
                        help="only time preprocess with and without the gate on --photos (default samples/), "
                             "ROUNDS rounds, and print the medians as JSON")
    args = parser.parse_args()
    if args.cost:
        paths = sorted((args.photos or REPO_ROOT / "samples").glob(args.glob))[: args.limit or None]
        print(json.dumps(preprocess_cost(paths, args.cost), indent=1))
        return
    if not args.reuse:
        folder = args.photos or (DEFAULT_PHOTOS if DEFAULT_PHOTOS.is_dir() else REPO_ROOT / "samples")
        paths = sorted(folder.glob(args.glob))[: args.limit or None]
        pipeline = gated_pipeline(args.model, UNGATED)
        normalising = gated_pipeline(args.model, UNGATED_NORMALISED)
        gated = gated_pipeline(args.model, POLICIES[args.policy])
        records = []
        for i, path in enumerate(paths):
            start = time.time()
            served = i % args.dice_stride == 0
            truth_path = folder.parent / "masks" / f"{path.stem}_HE.png"  # IDRiD's layout; absent: no truth
            truth = cv2.imread(str(truth_path), cv2.IMREAD_GRAYSCALE) > 0 if truth_path.is_file() else None
            records.append(measure_photo(path.name, path.read_bytes(), pipeline, normalising, gated,
                                         list(DEGRADATIONS), truth, serve_degraded=served))
            args.records.write_text(json.dumps(records))  # kept as it goes: a long run can be read part-way
            print(f"{i + 1}/{len(paths)} {path.name} {time.time() - start:.1f} s", flush=True)
    if args.other_photos and not args.reuse:
        other = {p.relative_to(args.other_photos).as_posix(): gate(p.read_bytes())
                 for p in sorted(args.other_photos.glob("*/*.jpg"))}
        args.other_records.write_text(json.dumps(other))
    records = json.loads(args.records.read_text())
    if args.reuse and args.remeasure:
        remeasure(records, args.photos or DEFAULT_PHOTOS)
        args.records.write_text(json.dumps(records))
        if args.other_photos:
            other = {p.relative_to(args.other_photos).as_posix(): gate(p.read_bytes())
                     for p in sorted(args.other_photos.glob("*/*.jpg"))}
            args.other_records.write_text(json.dumps(other))
    other = json.loads(args.other_records.read_text()) if args.other_records.exists() else {}
    summary = {"note": args.note, "policy": args.policy, **summarise(records, other, POLICIES[args.policy])}
    text = markdown(summary)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # the summary readable, the records one line each
        rows = ",\n".join(json.dumps(r, separators=(",", ":")) for r in records)
        text_json = json.dumps(summary, indent=1)[:-2] + f',\n "records": [\n{rows}\n ]\n}}\n'
        args.out.with_suffix(".json").write_text(text_json)
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
