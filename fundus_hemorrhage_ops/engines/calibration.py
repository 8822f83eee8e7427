"""The photos an int8 version is calibrated on, and the record in its model.json that lets a rebuild use them again.

Static int8 scales are the activation ranges (MinMax) over the calibration photos, so another set gives other
scales, hence other masks: v2 rebuilt from a changed manifest served IDRiD_11 at Dice 0.978 with the shipped v2.
A new int8 version draws its set from the data manifest (`draw`: RULE) and records, in model.json's
int8.calibration (`record`):

    rule, manifest_sha256   how the set was drawn, from which manifest (fundus_hemorrhage_training.common.file_hash)
    preprocessing           the plan the photos were preprocessed with (engines.plan; the version's own, except
                            where history says otherwise: v2 was calibrated before exposure normalisation existed)
    photos                  [{"id", "sha256"}]: manifest id and SHA-256 of the photo file's bytes, in order

A rebuild of that version uses exactly that set (`resolve`): each photo found by id in the manifest and checked by
hash, or a BuildError naming every photo that is missing, changed or was never identified.
"""

from __future__ import annotations

from pathlib import Path

from . import BuildError
from .version_folder import sha256

RULE = "manifest split 'train', full-size photos before 'lossy*' copies, then by id; the first N"


def _rows(manifest: Path):
    from fundus_hemorrhage_training.data import read_manifest
    if not Path(manifest).is_file():
        raise BuildError(f"int8 needs the data manifest (calibration photos; gate on val): {manifest} not found "
                         "(--manifest)")
    return read_manifest(Path(manifest))


def draw(manifest: Path, count: int) -> list[tuple[str, Path]]:
    """(id, photo path) of the first `count` photos by RULE."""
    rows = sorted((r for r in _rows(manifest) if r.split == "train"),
                  key=lambda r: (r.label_quality.startswith("lossy"), r.id))
    if not rows:
        raise BuildError(f"{manifest} has no train photos to calibrate on")
    return [(r.id, Path(r.image)) for r in rows[:count]]


def record(photos: list[tuple[str, Path]], plan: dict, manifest: Path, rule: str = RULE) -> dict:
    """model.json's int8.calibration for `photos` ((id, path)) preprocessed with `plan`."""
    from fundus_hemorrhage_training.common import file_hash
    return {"rule": rule, "manifest_sha256": file_hash(manifest), "preprocessing": plan,
            "photos": [{"id": pid, "sha256": sha256(path)} for pid, path in photos]}


def _describe(entries: list[dict]) -> str:
    notes: dict[str, int] = {}
    for entry in entries:
        note = entry.get("note") or "no id recorded"
        notes[note] = notes.get(note, 0) + 1
    return ", ".join(f"{n} x {note}" for note, n in notes.items())


def resolve(calibration: dict, manifest: Path, version: int) -> list[tuple[str, Path]]:
    """The recorded photos ((id, path), recorded order), found by id in `manifest` and verified by SHA-256.
    BuildError naming each photo that is not there, whose bytes changed, or that the record cannot name."""
    entries = calibration.get("photos") or []
    if not entries:
        raise BuildError(f"version {version}'s int8.calibration records no photos")
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
    if problems:
        raise BuildError(f"version {version}'s int8 calibration set ({len(entries)} photos, {manifest}) cannot be "
                         f"reproduced: {'; '.join(problems)}. --recalibrate draws a new set from the manifest "
                         "(the served masks are then compared; --allow-mask-change ships other masks)")
    return found
