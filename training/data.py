"""Manifest-driven data: full-size photos through the serving preprocessing, then patches and augmentation.

Every photo goes through `preprocess_backend` exactly as it does in Triton (same decode, FOV crop, CLAHE,
resize), once, and the working-grid result is cached in memory (and on disk under .cache/).
Masks are resampled onto the same working grid with an area filter: soft targets in [0, 1], so that
haemorrhages smaller than a working pixel still count.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from fundus_hemorrhage.preprocessing import PreprocessConfig, decode, preprocess_decoded, to_working, working_fov_mask

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass
class Example:
    id: str
    pixels: np.ndarray  # uint8 [S, S, 3] RGB, the serving model input x 255
    target: np.ndarray | None  # uint8 [S, S] soft mask x 255, None for unlabeled photos
    fov: np.ndarray  # uint8 [S, S] {0, 1}
    weight: float  # loss weight of this photo's labels


@dataclass(frozen=True)
class ManifestRow:
    id: str
    image: Path
    mask: Path
    width: int
    height: int
    label_quality: str
    split: str


def read_manifest(path: Path) -> list[ManifestRow]:
    root = path.parent
    with open(path, newline="") as f:
        return [ManifestRow(r["id"], root / r["image"], root / r["mask"], int(r["width"]), int(r["height"]),
                            r["label_quality"], r["split"]) for r in csv.DictReader(f)]


# Labels rebuilt from lossy 512 px copies agree with the exact ones at Dice ~0.6-0.8: trust them less.
LABEL_WEIGHTS = {"exact": 1.0, "exact-shifted": 1.0, "lossy-512": 0.5}


def load_example(image_path: Path, mask_path: Path | None, config: PreprocessConfig, id: str = "",
                 weight: float = 1.0) -> Example:
    data = Path(image_path).read_bytes()
    bgr, scale, (_, width, height, orientation) = decode(data, config)
    pre = preprocess_decoded(bgr, scale, width, height, config, orientation)
    pixels = np.rint(pre.pixels.transpose(1, 2, 0) * 255.0).astype(np.uint8)
    target = None
    if mask_path is not None:
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != (height, width):
            raise ValueError(f"{mask_path}: mask missing or not {width}x{height}")
        target = to_working((mask > 127).astype(np.uint8) * 255, pre.geometry, config.working_size)
    fov = working_fov_mask(pre.geometry, config.working_size)
    return Example(id or Path(image_path).stem, pixels, target, fov, weight)


def _cached(key: dict, cache_dir: Path | None, build):
    if cache_dir is None:
        return build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".npz")
    if path.exists():
        z = np.load(path, allow_pickle=False)
        target = z["target"] if z["has_target"] else None
        return Example(str(z["id"]), z["pixels"], target, z["fov"], float(z["weight"]))
    ex = build()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, id=ex.id, pixels=ex.pixels, target=ex.target if ex.target is not None else np.zeros(0),
             has_target=ex.target is not None, fov=ex.fov, weight=ex.weight)
    tmp.replace(path)
    return ex


def load_labelled(manifest: Path, split: str, config: PreprocessConfig, cache_dir: Path | None = None,
                  label_qualities: tuple[str, ...] | None = None) -> list[Example]:
    rows = [r for r in read_manifest(manifest) if r.split == split
            and (label_qualities is None or r.label_quality in label_qualities)]
    out = []
    for r in rows:
        key = {"image": str(r.image), "mask": str(r.mask), "config": repr(config), "v": 1}
        w = LABEL_WEIGHTS.get(r.label_quality, 1.0)
        out.append(_cached(key, cache_dir, lambda r=r, w=w: load_example(r.image, r.mask, config, r.id, w)))
    return out


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def split_ids(manifest: Path | None, split: str) -> set[str]:
    if manifest is None or not Path(manifest).exists():
        return set()
    return {r.id for r in read_manifest(Path(manifest)) if r.split == split}


def load_unlabeled(folder: Path, config: PreprocessConfig, cache_dir: Path | None = None,
                   exclude_ids: set[str] = frozenset()) -> list[Example]:
    """Unlabeled photos, less those whose file stem is in `exclude_ids` (the validation photos: the
    unlabeled IDRiD folder holds them too, and seeing them even without labels would flatter val scores)."""
    out = []
    for p in list_images(folder):
        if p.stem in exclude_ids:
            continue
        key = {"image": str(p), "config": repr(config), "v": 1}
        out.append(_cached(key, cache_dir, lambda p=p: load_example(p, None, config)))
    return out


# ---------------------------------------------------------------------------------------------- augmentation

def augment(rng: np.random.Generator, pixels: np.ndarray, *masks: np.ndarray, patch: int,
            lesion_focus: float = 0.0, target: np.ndarray | None = None, centre: tuple[float, float] | None = None):
    """Random scale/rotation/flip crop of `patch` px, and photometric jitter. Masks follow the geometry.

    With probability `lesion_focus` the crop is centred near a lesion pixel of `target`.
    With `centre` = (y, x) on the working grid, it is centred within +-patch/3 of that point (MoCo's two
    overlapping views of one photo).
    """
    s = pixels.shape[0]
    scale = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    angle = float(rng.uniform(-30.0, 30.0))
    if centre is not None:
        cy, cx = centre[0] + rng.uniform(-patch / 3, patch / 3), centre[1] + rng.uniform(-patch / 3, patch / 3)
    elif target is not None and rng.random() < lesion_focus:
        ys, xs = np.nonzero(target > 64)
        if ys.size:
            i = rng.integers(ys.size)
            cy, cx = ys[i] + rng.uniform(-patch / 3, patch / 3), xs[i] + rng.uniform(-patch / 3, patch / 3)
        else:
            cy, cx = rng.uniform(patch / 2, s - patch / 2, size=2)
    else:
        # Centre inside the FOV disc most of the time.
        r = rng.uniform(0, 0.42 * s) ** 0.5 * (0.42 * s) ** 0.5
        t = rng.uniform(0, 2 * np.pi)
        cx, cy = s / 2 + r * np.cos(t), s / 2 + r * np.sin(t)
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, scale)
    m[:, 2] += (patch / 2 - cx, patch / 2 - cy)
    flip_h, flip_v = rng.random() < 0.5, rng.random() < 0.5

    def warp(a, interp):
        out = cv2.warpAffine(a, m, (patch, patch), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if flip_h:
            out = out[:, ::-1]
        if flip_v:
            out = out[::-1]
        return np.ascontiguousarray(out)

    img = warp(pixels, cv2.INTER_LINEAR).astype(np.float32) / 255.0
    # Photometric jitter: other cameras, other exposures.
    img = img ** float(np.exp(rng.uniform(-0.25, 0.25)))
    img = img * rng.uniform(0.85, 1.15, size=3).astype(np.float32) + np.float32(rng.uniform(-0.05, 0.05))
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, 1.0)))
    img = np.clip(img, 0.0, 1.0)
    return (img, *[warp(a, cv2.INTER_LINEAR) for a in masks])


class PatchDataset(Dataset):
    """`length` random patches. Each index picks a photo (from `unlabeled` with probability
    `unlabeled_fraction`, else from `examples`); the crop and augmentation are random per (seed, epoch, index)."""

    def __init__(self, examples: list[Example], patch: int, length: int, lesion_focus: float = 0.5, seed: int = 0,
                 unlabeled: list[Example] | None = None, unlabeled_fraction: float = 0.0):
        self.examples, self.unlabeled = examples, unlabeled or []
        self.patch, self.length, self.lesion_focus = patch, length, lesion_focus
        self.unlabeled_fraction = unlabeled_fraction if self.unlabeled else 0.0
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if self.examples and rng.random() >= self.unlabeled_fraction:
            ex = self.examples[rng.integers(len(self.examples))]
        else:
            ex = self.unlabeled[rng.integers(len(self.unlabeled))]
        if ex.target is None:
            img, fov = augment(rng, ex.pixels, ex.fov, patch=self.patch)
            target, has_label = np.zeros_like(fov), 0.0
        else:
            img, target, fov = augment(rng, ex.pixels, ex.target, ex.fov, patch=self.patch,
                                       lesion_focus=self.lesion_focus, target=ex.target)
            has_label = ex.weight
        img *= fov[..., None]  # as in serving: nothing outside the FOV
        return {
            "pixels": torch.from_numpy(img.transpose(2, 0, 1).copy()),  # [3, P, P]
            "target": torch.from_numpy(target.astype(np.float32) / 255.0)[None],  # [1, P, P]
            "fov": torch.from_numpy(fov.astype(np.float32))[None],  # [1, P, P]
            "label_weight": torch.tensor(has_label, dtype=torch.float32),
        }
