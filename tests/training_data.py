"""Synthetic training data for the training tests: fundus-like photos and a manifest in the real one's format."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np


def fundus_photo(rng: np.random.Generator, width: int = 400, height: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """BGR photo and its 0/255 haemorrhage mask: an orange-red disc, a pale optic disc, dark red blobs."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    cx, cy, r = width / 2 + rng.uniform(-10, 10), height / 2, 0.47 * height
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    shade = np.clip(1.0 - 0.5 * d**2, 0, 1)[..., None]
    img = shade * np.array([30, 90, 200], np.float32) + rng.normal(0, 4, (height, width, 3))
    ox, oy = cx + rng.choice([-1, 1]) * 0.5 * r, cy + rng.uniform(-20, 20)
    img[(xx - ox) ** 2 + (yy - oy) ** 2 < (0.12 * r) ** 2] = (150, 210, 240)  # optic disc
    mask = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(3, 7)):
        a, t = rng.uniform(0, 0.8 * r), rng.uniform(0, 2 * np.pi)
        centre = (int(cx + a * np.cos(t)), int(cy + a * np.sin(t)))
        axes = (int(rng.integers(3, 10)), int(rng.integers(3, 10)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    img[mask > 0] = img[mask > 0] * 0.35 + np.array([15, 20, 70], np.float32) * 0.65
    img[d > 1.0] = 0
    mask[d > 1.0] = 0
    return np.clip(img, 0, 255).astype(np.uint8), mask


def training_data(root: Path) -> dict:
    """Under `root`: a manifest in the real one's format: exact labels, folds (fold 0 = val), OD masks, landmarks, and one
    photo without a haemorrhage annotation (split "unlabeled", as IDRiD_43)."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "od_masks"):
        (root / "idrid_he" / sub).mkdir(parents=True)
    rows, landmarks = [], []
    for i, (split, fold, quality) in enumerate([("train", 1, "exact"), ("train", 2, "exact"), ("train", 1, "exact"),
                                                ("val", 0, "exact"), ("val", 0, "exact"),
                                                ("unlabeled", None, "no_he_annotation")]):
        img, mask = fundus_photo(rng)
        name = f"SYN_{i:02d}"
        od = np.zeros_like(mask)
        cv2.circle(od, (100, 150), 20, 255, -1)
        cv2.imwrite(str(root / "idrid_he" / "images" / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        cv2.imwrite(str(root / "idrid_he" / "od_masks" / f"{name}_OD.png"), od)
        labelled = quality == "exact"
        if labelled:
            cv2.imwrite(str(root / "idrid_he" / "masks" / f"{name}_HE.png"), mask)
        rows.append({"id": name, "image": f"images/{name}.jpg", "mask": f"masks/{name}_HE.png" if labelled else "",
                     "od_mask": f"od_masks/{name}_OD.png", "width": 400, "height": 300, "label_quality": quality,
                     "split": split, "fold": "" if fold is None else fold,
                     "he_fraction": round(float((mask > 0).mean()), 5) if labelled else ""})
        landmarks.append({"id": name, "od_x": 100, "od_y": 150, "fovea_x": 220, "fovea_y": 160})
    manifest = root / "idrid_he" / "manifest.csv"
    for path, table in ((manifest, rows), (root / "idrid_he" / "landmarks.csv", landmarks[:4])):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    unlabeled = root / "unlabeled"
    for sub, ext in (("a", ".jpg"), ("b", ".png")):
        (unlabeled / sub).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(unlabeled / sub / f"u{i}{ext}"), fundus_photo(rng, 360, 320)[0])
    return {"manifest": manifest, "unlabeled": unlabeled, "cache": root / "cache"}


