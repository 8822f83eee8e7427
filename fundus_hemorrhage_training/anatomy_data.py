"""Landmark data for the optic-disc and fovea detector, on the serving path's working grid.

Each photo goes through the service's own preprocess (`fundus_hemorrhage.preprocessing.preprocess`), so the
detector trains and is evaluated on exactly the PIXELS tensor it sees in the ensemble. Landmarks are mapped from
the photo's pixels to the working grid with the photo's `Geometry`.

Sets (see ../shared/data/README.md):
- `grading`: 441 IDRiD grading photos (cropped, downscaled) with disc and fovea centres, no disc size;
  the detector trains on these (a fixed 15% of them held out to tune on).
- `idrid_he`: the 54 labelled segmentation photos at full size: disc centre and diameter from the exact disc
  mask, fovea from `landmarks.csv` for 44 of them. Never trained or tuned on: the test set.

The cache (`.cache/anatomy/<set>.npz`, ignored by git) holds uint8 working-grid pixels at `CACHE_SIZE` and the
landmarks in working-grid pixels at `contract.WORKING_SIZE`.
"""

from __future__ import annotations

import argparse
import csv
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from fundus_hemorrhage.contract import WORKING_SIZE
from fundus_hemorrhage.preprocessing import preprocess

from .common import DEFAULT_DATA, REPO_ROOT

CACHE_SIZE = 320  # side of the cached pixels; the detector's input side divides it
CACHE_DIR = REPO_ROOT / ".cache" / "anatomy"
SETS = ("grading", "idrid_he")


def _disc_from_mask(path: Path) -> tuple[float, float, float]:
    """Centre (centroid) and diameter (of the circle of equal area) of a 0/255 disc mask, original pixels."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), float(2.0 * np.sqrt(mask.sum() / np.pi))


def photo_rows(data: Path, name: str) -> list[dict]:
    """One dict per photo of a set: id, image (path), disc and fovea (x, y) in the photo's pixels (NaN unknown),
    disc_diameter (pixels; NaN unknown)."""
    if name == "grading":
        with open(data / "fundus_unlabeled" / "idrid_grading_landmarks.csv") as f:
            return [{"id": r["file"], "image": str(data / "fundus_unlabeled" / r["file"]),
                     "disc": (float(r["od_x"]), float(r["od_y"])),
                     "fovea": (float(r["fovea_x"]), float(r["fovea_y"])), "disc_diameter": np.nan}
                    for r in csv.DictReader(f)]
    root = data / "idrid_he"
    with open(root / "landmarks.csv") as f:
        fovea = {r["id"]: (float(r["fovea_x"]), float(r["fovea_y"])) for r in csv.DictReader(f)}
    rows = []
    with open(root / "manifest.csv") as f:
        for r in csv.DictReader(f):
            cx, cy, d = _disc_from_mask(root / r["od_mask"])
            rows.append({"id": r["id"], "image": str(root / r["image"]), "disc": (cx, cy),
                         "fovea": fovea.get(r["id"], (np.nan, np.nan)), "disc_diameter": d})
    return rows


def _load(row: dict) -> dict:
    pre = preprocess(Path(row["image"]).read_bytes())
    m = pre.geometry.original_to_working(WORKING_SIZE)
    to_w = lambda p: (m @ [p[0], p[1], 1.0]).tolist()  # noqa: E731
    rgb = np.rint(pre.pixels.transpose(1, 2, 0) * 255.0).astype(np.uint8)
    small = cv2.resize(rgb, (CACHE_SIZE, CACHE_SIZE), interpolation=cv2.INTER_AREA)
    return {"pixels": small, "disc": to_w(row["disc"]), "fovea": to_w(row["fovea"]),
            "disc_diameter": row["disc_diameter"] * m[0, 0], "geometry": pre.geometry.to_vector(),
            "scale": m[0, 0]}


def build(name: str, data: Path = DEFAULT_DATA, workers: int = 2) -> Path:
    """Preprocess every photo of a set and write its cache; returns the cache path."""
    rows = photo_rows(data, name)
    with ProcessPoolExecutor(workers) as pool:
        items = list(pool.map(_load, rows, chunksize=8))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"{name}.npz"
    np.savez_compressed(path, ids=np.array([r["id"] for r in rows]), images=np.array([r["image"] for r in rows]),
                        pixels=np.stack([i["pixels"] for i in items]),
                        disc=np.array([i["disc"] for i in items], np.float32),
                        fovea=np.array([i["fovea"] for i in items], np.float32),
                        disc_diameter=np.array([i["disc_diameter"] for i in items], np.float32),
                        geometry=np.stack([i["geometry"] for i in items]),
                        scale=np.array([i["scale"] for i in items]))
    return path


def load(name: str, data: Path = DEFAULT_DATA) -> dict[str, np.ndarray]:
    """The set's cache as arrays (built on first use): pixels uint8 [N, CACHE_SIZE, CACHE_SIZE, 3] RGB (CLAHE'd,
    as PIXELS), disc/fovea float32 [N, 2] working-grid pixels (NaN where unknown), disc_diameter [N] (NaN unknown),
    scale [N] working pixels per photo pixel, ids, images (paths), geometry [N, GEOMETRY_LENGTH]."""
    path = CACHE_DIR / f"{name}.npz"
    if not path.exists():
        build(name, data)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("sets", nargs="*", help=f"any of {SETS} (default: all)")
    args = parser.parse_args()
    for name in args.sets or SETS:
        print(build(name, args.data, args.workers))


if __name__ == "__main__":
    main()
