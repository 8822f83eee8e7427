"""Synthetic fundus photographs for tests: a reddish disc on black, with dark 'haemorrhage' blobs."""

from __future__ import annotations

import cv2
import numpy as np


def synthetic_fundus(width: int = 900, height: int = 700, radius: int | None = None, center=None,
                     blobs: list[tuple[int, int, int]] = (), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(BGR photo, uint8 0/255 mask of the blobs). Blobs are (x, y, r) in photo pixels."""
    rng = np.random.default_rng(seed)
    radius = radius or int(min(width, height) * 0.48)
    cx, cy = center or (width // 2, height // 2)
    img = np.zeros((height, width, 3), np.uint8)
    cv2.circle(img, (cx, cy), radius, (40, 90, 190), -1)  # BGR: orange-red retina
    noise = rng.normal(0, 6, img.shape).astype(np.int16)
    img = np.clip(img.astype(np.int16) + noise * (img > 0), 0, 255).astype(np.uint8)
    cv2.circle(img, (cx - radius // 2, cy), max(3, radius // 8), (150, 220, 250), -1)  # optic disc
    mask = np.zeros((height, width), np.uint8)
    for x, y, r in blobs:
        cv2.circle(img, (x, y), r, (20, 25, 90), -1)
        cv2.circle(mask, (x, y), r, 255, -1)
    return img, mask


def encode(img: np.ndarray, ext: str = ".jpg", params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()
