"""The int8 calibration of a version: the photos it was calibrated on (model.json's int8.calibration) and its
result, the calibration cache (calibration.json in the version folder), which a rebuild quantises with.

Static int8 scales are the activation ranges (MinMax) over the calibration photos, so another set gives other
scales, hence other masks: v2 rebuilt from a changed manifest served IDRiD_11 at Dice 0.978 with the shipped v2.
As with TensorRT's INT8 calibration cache, what makes a rebuild reproducible is the calibration's *result*, not
its input: photos get removed, re-encoded or preprocessed differently; the recorded scales do not change.

A new int8 version draws its set from the data manifest (`draw`: RULE), calibrates on it, and records
  - in model.json's int8.calibration (`record`):
        rule, manifest_sha256   how the set was drawn, from which manifest (fundus_hemorrhage_training.common.file_hash)
        preprocessing           the plan the photos were preprocessed with (engines.plan; the version's own, except
                                where history says otherwise: v2 was calibrated before exposure normalisation existed)
        photos                  [{"id", "sha256"}]: manifest id and SHA-256 of the photo file's bytes, in order
        cache                   {"file", "sha256", "activations", "obtained"}: the calibration cache (`cache_record`)
  - in the folder's calibration.json (CACHE_FILE, `write_cache`): the scale and zero point of every quantised
    activation, read back from the quantised graph (`cache_from_qdq_graph`):
        {"format": 1, "quantisation": ..., "tensors": {tensor name: {"scale": float32, "zero_point": uint8}}}
    per-tensor, asymmetric uint8: q = clamp(round(x / scale) + zero_point, 0, 255), x ~ (q - zero_point) * scale.
    Scales are float32 values written as the shortest decimal that reads back to the same float32's double.

A rebuild of an int8 version (`recorded_cache`) quantises with exactly those scales and zero points
(engines.int8.quantize_int8(cache=...)), whether or not the recorded photos still exist: the build log says so
and names the photos that are missing or changed (`check`). Only a version without a cache (none before
2026-12-07; v2's was then recovered from its graph) calibrates again, on exactly its recorded set (`resolve`):
each photo found by id in the manifest and checked by hash, or a BuildError naming every photo that is missing,
changed or was never identified. --recalibrate draws a new set and ignores both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import BuildError
from .version_folder import sha256

RULE = "manifest split 'train', full-size photos before 'lossy*' copies, then by id; the first N"
CACHE_FILE = "calibration.json"
CACHE_FORMAT = 1
QUANTISATION = ("per-tensor asymmetric uint8 activations: q = clamp(round(x / scale) + zero_point, 0, 255) "
                "(ONNX QuantizeLinear)")


def _rows(manifest: Path):
    from fundus_hemorrhage_training.data import read_manifest
    if not Path(manifest).is_file():
        raise BuildError(f"int8 needs the data manifest (calibration photos; gate on val): {manifest} not found "
                         "(--manifest)")
    return read_manifest(Path(manifest))


def draw(manifest: Path, count: int) -> list[tuple[str, Path]]:
    """(id, photo path) of the first `count` photos by RULE; BuildError naming any drawn photo that is not there."""
    rows = sorted((r for r in _rows(manifest) if r.split == "train"),
                  key=lambda r: (r.label_quality.startswith("lossy"), r.id))
    if not rows:
        raise BuildError(f"{manifest} has no train photos to calibrate on")
    drawn = [(r.id, Path(r.image)) for r in rows[:count]]
    missing = [f"{pid} ({path} not found)" for pid, path in drawn if not path.is_file()]
    if missing:
        raise BuildError(f"the calibration photos drawn from {manifest} are not all there: missing "
                         f"{', '.join(missing)}")
    return drawn


def record(photos: list[tuple[str, Path]], plan: dict, manifest: Path, rule: str = RULE) -> dict:
    """model.json's int8.calibration for `photos` ((id, path)) preprocessed with `plan` (its cache: cache_record)."""
    from fundus_hemorrhage_training.common import file_hash
    return {"rule": rule, "manifest_sha256": file_hash(manifest), "preprocessing": plan,
            "photos": [{"id": pid, "sha256": sha256(path)} for pid, path in photos]}


def _describe(entries: list[dict]) -> str:
    notes: dict[str, int] = {}
    for entry in entries:
        note = entry.get("note") or "no id recorded"
        notes[note] = notes.get(note, 0) + 1
    return ", ".join(f"{n} x {note}" for note, n in notes.items())


def check(calibration: dict, manifest: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(the recorded photos found by id in `manifest` with their recorded SHA-256, as (id, path) in recorded
    order; what is wrong with the others: "missing ...", "changed ...", "N never identified (...)")."""
    entries = calibration.get("photos") or []
    by_id = {r.id: Path(r.image) for r in _rows(manifest)}
    found, missing, changed = [], [], []
    unnamed = [e for e in entries if not e.get("id") or not e.get("sha256")]
    for entry in entries:
        if entry in unnamed:
            continue
        path = by_id.get(entry["id"])
        if path is None or not path.is_file():
            missing.append(entry["id"] + (" (not in the manifest)" if path is None else f" ({path} not found)"))
        elif sha256(path) != entry["sha256"]:
            changed.append(f"{entry['id']} (sha256 {sha256(path)[:12]}, recorded {entry['sha256'][:12]})")
        else:
            found.append((entry["id"], path))
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
               ([f"changed {', '.join(changed)}"] if changed else []) + \
               ([f"{len(unnamed)} never identified ({_describe(unnamed)})"] if unnamed else [])
    return found, problems


def resolve(calibration: dict, manifest: Path, version: int) -> list[tuple[str, Path]]:
    """The recorded photos ((id, path), recorded order), found by id in `manifest` and verified by SHA-256.
    BuildError naming each photo that is not there, whose bytes changed, or that the record cannot name."""
    entries = calibration.get("photos") or []
    if not entries:
        raise BuildError(f"version {version}'s int8.calibration records no photos")
    found, problems = check(calibration, manifest)
    if problems:
        raise BuildError(f"version {version}'s int8 calibration set ({len(entries)} photos, {manifest}) cannot be "
                         f"reproduced: {'; '.join(problems)}. --recalibrate draws a new set from the manifest "
                         "(the served masks are then compared; --allow-mask-change ships other masks)")
    return found


# ------------------------------------------------------------------------------------------------------------
# the calibration cache: the result of a calibration, per quantised activation


def cache_from_qdq_graph(model) -> dict[str, dict]:
    """{tensor: {"scale": float, "zero_point": int}} for every activation a QDQ graph quantises, in node order:
    the input of each QuantizeLinear that is not an initializer (weights and biases are stored already quantised,
    behind a DequantizeLinear only), with its float32 scale and uint8 zero point. `model`: a path or ModelProto.

    These are the calibration's result. Every int8 build reads its cache back from the graph it made, and v2's
    cache was recovered with this function from its shipped model.onnx (one-off, 2026-12-07: v2 was built
    before caches existed and 11 of its 16 calibration photos are gone); quantising v2's model_fp32.onnx with
    that cache gives its model.onnx's graph exactly. BuildError for what this project's quantisation never
    makes: a per-channel or non-uint8 activation, a scale or zero point that is not an initializer."""
    import onnx
    from onnx import numpy_helper
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    inits = {i.name: i for i in model.graph.initializer}
    tensors: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        if len(node.input) < 3 or not all(name in inits for name in node.input[1:3]):
            raise BuildError(f"QuantizeLinear {node.name}: its scale and zero point are not both initializers")
        scale, zero = (numpy_helper.to_array(inits[name]) for name in node.input[1:3])
        if scale.size != 1 or zero.size != 1 or scale.dtype != np.float32 or zero.dtype != np.uint8:
            raise BuildError(f"QuantizeLinear {node.name}: {scale.dtype} scale of shape {list(scale.shape)}, "
                             f"{zero.dtype} zero point; a calibration cache holds per-tensor float32/uint8 ones")
        entry = {"scale": float(scale.reshape(())), "zero_point": int(zero.reshape(()))}
        if tensors.setdefault(node.input[0], entry) != entry:
            raise BuildError(f"{node.input[0]} is quantised twice, with different scales or zero points")
    return tensors


def write_cache(path: Path, tensors: dict[str, dict]) -> Path:
    """calibration.json: one line per tensor, in the graph's order; the same tensors give the same bytes."""
    lines = [f"    {json.dumps(name)}: {json.dumps({'scale': e['scale'], 'zero_point': e['zero_point']})}"
             for name, e in tensors.items()]
    Path(path).write_text('{\n  "format": %d,\n  "quantisation": %s,\n  "tensors": {\n%s\n  }\n}\n'
                          % (CACHE_FORMAT, json.dumps(QUANTISATION), ",\n".join(lines)))
    return Path(path)


def read_cache(path: Path) -> dict[str, dict]:
    """The tensors of a calibration.json (write_cache), checked: BuildError naming the file and what is wrong."""
    try:
        document = json.loads(Path(path).read_text())
        tensors = document["tensors"]
        if document.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {document.get('format')!r}, this build reads {CACHE_FORMAT}")
        if not isinstance(tensors, dict) or not tensors:
            raise ValueError("no tensors")
        for name, entry in tensors.items():
            scale, zero = entry["scale"], entry["zero_point"]
            if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0
                    and float(np.float32(scale)) == scale):
                raise ValueError(f"{name}: scale {scale!r} is not a positive float32")
            if not (isinstance(zero, int) and 0 <= zero <= 255):
                raise ValueError(f"{name}: zero point {zero!r} is not a uint8")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"calibration cache {path}: {type(exc).__name__}: {exc}") from None
    return {name: {"scale": e["scale"], "zero_point": e["zero_point"]} for name, e in tensors.items()}


def cache_record(path: Path, tensors: dict[str, dict], obtained: str) -> dict:
    """model.json's int8.calibration.cache for the calibration.json at `path`."""
    return {"file": Path(path).name, "sha256": sha256(path), "activations": len(tensors), "obtained": obtained}


def recorded_cache(folder: Path, calibration: dict, version: int) -> dict[str, dict] | None:
    """The calibration cache version `version` (in `folder`) records in int8.calibration.cache, checked by its
    SHA-256; None for a version recorded without one. BuildError if the file is missing, changed or unreadable."""
    entry = calibration.get("cache")
    if not entry:
        return None
    path = Path(folder) / entry.get("file", CACHE_FILE)
    if not path.is_file():
        raise BuildError(f"version {version}'s calibration cache {path} is missing (model.json records it): restore "
                         "it (git), or --recalibrate draws a new calibration set")
    if sha256(path) != entry.get("sha256"):
        raise BuildError(f"version {version}'s calibration cache {path} changed (sha256 {sha256(path)[:12]}, "
                         f"recorded {str(entry.get('sha256'))[:12]}): restore it (git), or --recalibrate")
    return read_cache(path)


def cache_differences(expected: dict[str, dict], got: dict[str, dict]) -> list[str]:
    """How the quantised activations of a graph (`got`, cache_from_qdq_graph) differ from a cache; [] if not."""
    return ([f"{name} is not quantised" for name in expected if name not in got]
            + [f"{name} is quantised but not in the cache" for name in got if name not in expected]
            + [f"{name}: scale {got[name]['scale']!r}, zero point {got[name]['zero_point']} (cache "
               f"{expected[name]['scale']!r}, {expected[name]['zero_point']})"
               for name in expected if name in got and got[name] != expected[name]])
