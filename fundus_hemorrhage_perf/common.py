"""Shared helpers for the perf tools: photos, request building, response checks, the served version, machine facts
(serve.py start/stop: fundus_hemorrhage_ops.local_server)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from fundus_hemorrhage.contract import ENSEMBLE, SEGMENTATION_MODEL  # noqa: F401  (ENSEMBLE: for the perf tools)
from fundus_hemorrhage.model_config import version_numbers
from fundus_hemorrhage_ops.local_server import MODEL_REPOSITORY, REPO_ROOT

CHECKPOINTS = REPO_ROOT / "checkpoints"
SAMPLE_PHOTOS = REPO_ROOT / "samples"  # three full-size IDRiD photos; --photos for a larger set
DEFAULT_GLOB = "*.jpg"


def relative(path: str | Path | None) -> str | None:
    """`path` as results record it: relative to the repository (e.g. "../shared/data/..." beside it), or
    "<tmp>/..." inside the system's temporary folder, so that no machine's absolute path gets committed."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    tmp = Path(tempfile.gettempdir()).resolve()
    if resolved.is_relative_to(tmp) and not resolved.is_relative_to(REPO_ROOT):  # the checkout may be in /tmp
        return (Path("<tmp>") / resolved.relative_to(tmp)).as_posix()
    return Path(os.path.relpath(resolved, REPO_ROOT)).as_posix()


def load_photos(folder: str | Path | None = None, pattern: str = DEFAULT_GLOB) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every photo in `folder` (default: the repository's samples/) matching `pattern`,
    sorted by name."""
    folder = Path(folder) if folder else SAMPLE_PHOTOS
    paths = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not paths:
        raise SystemExit(f"no photos matching {pattern!r} in {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


class PhotoCycle:
    """Hands out batches of photos round-robin, each user/client starting at its own offset."""

    def __init__(self, photos: list[tuple[str, bytes]], batch: int, offset: int = 0):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.photos, self.batch, self.position = photos, batch, offset % len(photos)

    def next(self) -> list[bytes]:
        out = [self.photos[(self.position + i) % len(self.photos)][1] for i in range(self.batch)]
        self.position = (self.position + self.batch) % len(self.photos)
        return out


def image_tensor(batch: list[bytes]) -> np.ndarray:
    """The ensemble's IMAGE input: BYTES [N, 1]."""
    arr = np.empty((len(batch), 1), dtype=np.object_)
    for i, data in enumerate(batch):
        arr[i, 0] = data
    return arr


def check_outputs(lesions: np.ndarray | None, masks: np.ndarray | None, expected: int) -> int:
    """Raise if the response does not hold one ok report and one mask per photo; returns the response bytes."""
    if lesions is None or masks is None:
        raise RuntimeError("response lacks LESIONS or MASK")
    lesions, masks = lesions.reshape(-1), masks.reshape(-1)
    if lesions.shape[0] != expected or masks.shape[0] != expected:
        raise RuntimeError(f"expected {expected} results, got {lesions.shape[0]} reports and {masks.shape[0]} masks")
    for i, raw in enumerate(lesions):
        report = json.loads(raw)
        if report.get("status") != "ok":
            raise RuntimeError(f"photo {i}: {report.get('error', report.get('status'))}")
        if not masks[i]:
            raise RuntimeError(f"photo {i}: empty mask")
    return int(sum(len(x) for x in lesions) + sum(len(x) for x in masks))


def served_version(model_repository: Path = MODEL_REPOSITORY,
                   model: str = SEGMENTATION_MODEL) -> tuple[Path, dict]:
    """The newest version folder of `model` holding a model.onnx, and its model.json (threshold, checkpoint)."""
    versions = version_numbers(model_repository / model)[::-1]
    for v in versions:
        folder = model_repository / model / str(v)
        if (folder / "model.onnx").exists():
            meta_path = folder / "model.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            return folder, meta
    raise SystemExit(f"no {model}/<version>/model.onnx under {model_repository}")


def served_checkpoint(meta: dict, checkpoints: Path = CHECKPOINTS) -> Path:
    """The training checkpoint a version was built from: its model.json's "checkpoint", under checkpoints/."""
    name = meta.get("checkpoint")
    if not name:
        raise SystemExit("the served version's model.json names no checkpoint: pass --checkpoint")
    return checkpoints / name


def machine_info() -> dict:
    info = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}
    try:
        info["loadavg_1m_5m_15m"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import psutil
        info["cpu_count_physical"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info
