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

from fundus_hemorrhage.files import replaced_atomically
from fundus_hemorrhage.preprocessing import PreprocessConfig, decode, preprocess_decoded, to_working, working_fov_mask

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass
class Example:
    id: str
    pixels: np.ndarray  # uint8 [S, S, 3] RGB, the serving model input x 255
    target: np.ndarray | None  # uint8 [S, S] soft haemorrhage mask x 255, None for unlabeled photos
    fov: np.ndarray  # uint8 [S, S] {0, 1}
    weight: float  # loss weight of this photo's labels
    od: np.ndarray | None = None  # uint8 [S, S] soft optic-disc mask x 255, when asked for and available


@dataclass(frozen=True)
class ManifestRow:
    """One row of idrid_he/manifest.csv. `mask` is None for a photo without a haemorrhage annotation
    (label_quality "no_he_annotation", split "unlabeled": IDRiD_43), which is not a photo without haemorrhages.
    `fold` (0-4, stratified by `he_fraction`, fold 0 = split "val") is None there too."""
    id: str
    image: Path
    mask: Path | None
    width: int
    height: int
    label_quality: str
    split: str
    od_mask: Path | None = None
    fold: int | None = None
    he_fraction: float | None = None

    @property
    def labelled(self) -> bool:
        return self.mask is not None and self.label_quality in LABEL_WEIGHTS


# Only exact full-size labels remain (the lossy 512 px pairs are gone from the data); a quality not listed here
# is not trained on as a label.
LABEL_WEIGHTS = {"exact": 1.0}
UNLABELED_SPLIT = "unlabeled"


def read_manifest(path: Path) -> list[ManifestRow]:
    """Rows of a manifest (columns id, image, mask, od_mask, width, height, label_quality, split, fold,
    he_fraction; od_mask, fold and he_fraction may be absent or empty). Paths are resolved against its folder."""
    root = Path(path).parent

    def opt(r: dict, key: str, cast):
        value = (r.get(key) or "").strip()
        return cast(value) if value else None

    with open(path, newline="") as f:
        return [ManifestRow(r["id"], root / r["image"], opt(r, "mask", lambda v: root / v), int(r["width"]),
                            int(r["height"]), r["label_quality"], r["split"], opt(r, "od_mask", lambda v: root / v),
                            opt(r, "fold", int), opt(r, "he_fraction", float))
                for r in csv.DictReader(f)]


def select_rows(manifest: Path, split: str | None = None, folds: tuple[int, ...] | None = None,
                labelled: bool = True) -> list[ManifestRow]:
    """Rows of `split` (None: any), or of `folds` when given (cross-validation: e.g. train = folds 1-4 and
    val = fold 0 is the manifest's own split); with `labelled`, only rows with a usable haemorrhage label."""
    rows = read_manifest(manifest)
    if folds is not None:
        rows = [r for r in rows if r.fold in folds]
    elif split is not None:
        rows = [r for r in rows if r.split == split]
    return [r for r in rows if r.labelled] if labelled else rows


def read_landmarks(path: Path) -> dict[str, tuple[float, float, float, float]]:
    """idrid_he/landmarks.csv: id -> (od_x, od_y, fovea_x, fovea_y) in original pixels (44 of the photos)."""
    with open(path, newline="") as f:
        return {r["id"]: (float(r["od_x"]), float(r["od_y"]), float(r["fovea_x"]), float(r["fovea_y"]))
                for r in csv.DictReader(f)}


def _working_mask(path: Path, width: int, height: int, geometry, working_size: int) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None or mask.shape != (height, width):
        raise ValueError(f"{path}: mask missing or not {width}x{height}")
    return to_working((mask > 127).astype(np.uint8) * 255, geometry, working_size)


def load_example(image_path: Path, mask_path: Path | None, config: PreprocessConfig, id: str = "",
                 weight: float = 1.0, od_mask_path: Path | None = None) -> Example:
    """One photo through the serving preprocessing; its full-size masks area-resampled onto the working grid."""
    data = Path(image_path).read_bytes()
    bgr, scale, (_, width, height, orientation) = decode(data, config)
    pre = preprocess_decoded(bgr, scale, width, height, config, orientation)
    pixels = np.rint(pre.pixels.transpose(1, 2, 0) * 255.0).astype(np.uint8)
    target = None if mask_path is None else _working_mask(mask_path, width, height, pre.geometry, config.working_size)
    od = None if od_mask_path is None else _working_mask(od_mask_path, width, height, pre.geometry,
                                                           config.working_size)
    fov = working_fov_mask(pre.geometry, config.working_size)
    return Example(id or Path(image_path).stem, pixels, target, fov, weight, od)


def _cached(key: dict, cache_dir: Path | None, build):
    if cache_dir is None:
        return build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".npz")
    if path.exists():
        z = np.load(path, allow_pickle=False)
        target = z["target"] if z["has_target"] else None
        od = z["od"] if "od" in z and z["od"].size else None
        return Example(str(z["id"]), z["pixels"], target, z["fov"], float(z["weight"]), od)
    ex = build()
    with replaced_atomically(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, id=ex.id, pixels=ex.pixels, target=ex.target if ex.target is not None else np.zeros(0),
                 has_target=ex.target is not None, fov=ex.fov, weight=ex.weight,
                 od=ex.od if ex.od is not None else np.zeros(0, np.uint8))
    return ex


def load_rows(rows: list[ManifestRow], config: PreprocessConfig, cache_dir: Path | None = None,
              with_od: bool = False, with_labels: bool = True) -> list[Example]:
    """Examples of manifest rows: haemorrhage targets when `with_labels` and the row has one, OD masks when
    `with_od` (for other heads) and the row has one."""
    out = []
    for r in rows:
        mask = r.mask if with_labels and r.labelled else None
        od = r.od_mask if with_od else None
        key = {"image": str(r.image), "mask": str(mask), "od": str(od), "config": repr(config), "v": 2}
        w = LABEL_WEIGHTS.get(r.label_quality, 1.0)
        out.append(_cached(key, cache_dir, lambda r=r, w=w, mask=mask, od=od:
                           load_example(r.image, mask, config, r.id, w, od)))
    return out


def load_labelled(manifest: Path, split: str, config: PreprocessConfig, cache_dir: Path | None = None,
                  folds: tuple[int, ...] | None = None, with_od: bool = False) -> list[Example]:
    """The labelled photos of `split` (or of `folds`), targets and FOV on the working grid."""
    return load_rows(select_rows(manifest, split, folds), config, cache_dir, with_od)


def load_manifest_images(manifest: Path, config: PreprocessConfig, cache_dir: Path | None = None,
                         exclude_splits: tuple[str, ...] = ("val",)) -> list[Example]:
    """The manifest's photos as unlabeled examples (self-supervision may use the labelled photos' images, and
    IDRiD_43 whose haemorrhages were never annotated), less the rows of `exclude_splits` (val: seeing them even
    without labels would flatter val scores)."""
    rows = [r for r in read_manifest(manifest) if r.split not in exclude_splits]
    return load_rows(rows, config, cache_dir, with_labels=False)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def split_ids(manifest: Path | None, split: str) -> set[str]:
    """Ids of a manifest's `split` (empty without a manifest): photos to keep out of an unlabeled folder."""
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
    `unlabeled_fraction`, else from `examples`); the crop and augmentation are random per (seed, epoch, index).

    Items: pixels [3, P, P] float in [0, 1], target [1, P, P] soft haemorrhage mask, fov [1, P, P],
    label_weight [] (0 for an unlabeled patch); with `with_od` also od [1, P, P] (soft optic-disc mask) and
    has_od [] (0 where the photo has none), for heads other than haemorrhage.
    """

    def __init__(self, examples: list[Example], patch: int, length: int, lesion_focus: float = 0.5, seed: int = 0,
                 unlabeled: list[Example] | None = None, unlabeled_fraction: float = 0.0, with_od: bool = False):
        self.examples, self.unlabeled = examples, unlabeled or []
        self.patch, self.length, self.lesion_focus = patch, length, lesion_focus
        self.unlabeled_fraction = unlabeled_fraction if self.unlabeled else 0.0
        self.seed, self.epoch, self.with_od = seed, 0, with_od

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
        od = ex.od if self.with_od and ex.od is not None else None
        extra = (od,) if od is not None else ()
        if ex.target is None:
            img, fov, *od_patch = augment(rng, ex.pixels, ex.fov, *extra, patch=self.patch)
            target, has_label = np.zeros_like(fov), 0.0
        else:
            img, target, fov, *od_patch = augment(rng, ex.pixels, ex.target, ex.fov, *extra, patch=self.patch,
                                                  lesion_focus=self.lesion_focus, target=ex.target)
            has_label = ex.weight
        img *= fov[..., None]  # as in serving: nothing outside the FOV
        item = {
            "pixels": torch.from_numpy(img.transpose(2, 0, 1).copy()),  # [3, P, P]
            "target": torch.from_numpy(target.astype(np.float32) / 255.0)[None],  # [1, P, P]
            "fov": torch.from_numpy(fov.astype(np.float32))[None],  # [1, P, P]
            "label_weight": torch.tensor(has_label, dtype=torch.float32),
        }
        if self.with_od:
            od_patch = od_patch[0] if od_patch else np.zeros_like(fov)
            item["od"] = torch.from_numpy(od_patch.astype(np.float32) / 255.0)[None]  # [1, P, P]
            item["has_od"] = torch.tensor(float(od is not None))
        return item
