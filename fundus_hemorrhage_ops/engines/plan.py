"""A unet version's preprocessing plan: what its PIXELS must be, as model.json's "preprocessing" records it.

The plan is written from the runtime's own configuration (fundus_hemorrhage.preprocessing.PreprocessConfig and its
quality.QualityThresholds), by one function, `preprocessing_plan`; `preprocess_config` turns a plan back into the
PreprocessConfig that produces it (calibration of an int8 rebuild uses that). Only what shapes the pixels a model
sees is in it:

    working_size  side of the square working grid, px
    pixels        float32 [3, S, S], RGB, 8-bit value / 255 (so in [0, 1]), 0 outside the field of view (FOV)
    crop          a square around the FOV disc (side = its diameter, zero padding outside the photo), area-resampled
                  to S x S (preprocessing.to_working)
    clahe         CLAHE on the L channel of OpenCV's 8-bit L*a*b*, clip limit and tile grid (tiles per side), after
                  the resize
    exposure      quality.judge's gain on every channel of a gradable photo before the crop: median FOV luma
                  (BT.601, 0-255) below `normalise_below` -> scaled to `dark_target`, above `normalise_above` ->
                  to `bright_target` (quality.TYPICAL_BRIGHTNESS, 104: the IDRiD training photos' median)

Request guards (max_bytes, max_pixels, min_side) and the gate's refusal limits decide whether a photo is segmented,
not what the model sees: they are not in the plan. Non-finite floats are written "inf"/"-inf" (strict JSON).
Serving refuses a version whose plan differs from its preprocess step's (`plan_difference`,
fundus_hemorrhage_ops.serving.validation); a model.json without "preprocessing" is read as the default plan
(`declared_plan`). A change of the preprocessing code that these fields cannot express must bump PLAN.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fundus_hemorrhage import quality
from fundus_hemorrhage.contract import WORKING_SIZE
from fundus_hemorrhage.preprocessing import PreprocessConfig

PLAN = 1  # revision of the fields and steps below
PIXELS = "float32 [3,S,S] RGB value/255, 0 outside the FOV"
CROP = "square around the FOV disc, area-resampled to SxS"
CLAHE_CHANNEL = "L of 8-bit L*a*b* (OpenCV)"


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _float(value) -> float:
    return float(value)  # float("inf") and float("-inf") read the strings back


def preprocessing_plan(config: PreprocessConfig = PreprocessConfig()) -> dict:
    """The plan of what `fundus_hemorrhage.preprocessing.preprocess(data, config)` gives the model."""
    t = config.quality_thresholds
    return {"plan": PLAN, "working_size": int(config.working_size), "pixels": PIXELS, "crop": CROP,
            "clahe": {"channel": CLAHE_CHANNEL, "clip_limit": float(config.clahe_clip_limit),
                      "tile_grid": int(config.clahe_tile_grid)},
            "exposure": {"normalise_below": _number(t.normalise_below), "dark_target": _number(t.dark_target),
                         "normalise_above": _number(t.normalise_above),
                         "bright_target": _number(quality.TYPICAL_BRIGHTNESS)}}


def preprocess_config(plan: dict, base: PreprocessConfig = PreprocessConfig()) -> PreprocessConfig:
    """The PreprocessConfig (`base` for what the plan does not set) whose preprocessing is `plan`. ValueError if
    this runtime cannot produce it (another plan revision, pixel layout, crop, CLAHE channel or bright target)."""
    fixed = {"plan": PLAN, "pixels": PIXELS, "crop": CROP}
    for key, value in fixed.items():
        if plan.get(key) != value:
            raise ValueError(f"preprocessing {key} {plan.get(key)!r}: this runtime does {value!r}")
    clahe, exposure = plan["clahe"], plan["exposure"]
    if clahe.get("channel") != CLAHE_CHANNEL:
        raise ValueError(f"preprocessing clahe.channel {clahe.get('channel')!r}: this runtime does {CLAHE_CHANNEL!r}")
    if _float(exposure["bright_target"]) != quality.TYPICAL_BRIGHTNESS:
        raise ValueError(f"preprocessing exposure.bright_target {exposure['bright_target']}: this runtime normalises "
                         f"bright photos to {quality.TYPICAL_BRIGHTNESS}")
    thresholds = replace(base.quality_thresholds, normalise_below=_float(exposure["normalise_below"]),
                         dark_target=_float(exposure["dark_target"]),
                         normalise_above=_float(exposure["normalise_above"]))
    config = replace(base, working_size=int(plan["working_size"]), clahe_clip_limit=float(clahe["clip_limit"]),
                     clahe_tile_grid=int(clahe["tile_grid"]), quality_thresholds=thresholds)
    unknown = plan_difference(plan, preprocessing_plan(config))
    if unknown:  # fields this runtime does not know, or values it cannot set
        raise ValueError(f"preprocessing plan not reproducible here: {unknown}")
    return config


def served_plan(working_size: int = WORKING_SIZE) -> dict:
    """The plan of the ensemble's preprocess step: PreprocessConfig's defaults at the repository's working size
    (model_repository/preprocess/1/model.py sets only working_size and the request guards)."""
    return preprocessing_plan(PreprocessConfig(working_size=working_size))


def declared_plan(meta: dict) -> dict:
    """A version's plan from its model.json: "preprocessing", else (versions built before it was recorded) the
    default plan at the version's build working size."""
    if meta.get("preprocessing"):
        return meta["preprocessing"]
    return served_plan(int((meta.get("build") or {}).get("working_size") or WORKING_SIZE))


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def plan_difference(declared: dict, served: dict) -> str | None:
    """None when the plans are the same, else the first differing fields, one line, e.g.
    "exposure.normalise_below: the version needs 56.0, the preprocess step does inf"."""
    a, b = _flat(declared), _flat(served)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "absent") != b.get(k, "absent"))
    if not keys:
        return None
    shown = "; ".join(f"{k}: the version needs {a.get(k, 'absent')}, the preprocess step does {b.get(k, 'absent')}"
                      for k in keys[:3])
    return shown + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")
