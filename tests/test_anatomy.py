"""Optic disc and fovea detection: decoding, confidence and null paths, disc diameter, the committed detector on
the committed sample photos, and its batching (its cost is measured by fundus_hemorrhage_training/evaluate_anatomy.py,
not asserted here)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_hemorrhage.anatomy import (ANATOMY_LENGTH, CELLS, DISC_DIAMETER_PRIOR, FOUND, IMPLAUSIBLE, MODEL_PATH,
                                       NO_DISC, OUTSIDE, REASONS, Anatomy, AnatomyDetector,
                                       anatomy_from_probability, decode_landmarks, disc_diameter, plausible)
from fundus_hemorrhage.contract import WORKING_SIZE
from fundus_hemorrhage.preprocessing import preprocess
from fundus_hemorrhage.retinal_frame import Landmarks

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CELL = WORKING_SIZE / CELLS
# Truth for the committed samples: disc centre (centroid) and diameter (equal-area circle) of the IDRiD disc
# masks; fovea from the IDRiD localisation ground truth (../shared/data/idrid_he/landmarks.csv) where it has one.
# IDRiD_04 is not macula-centred (the disc is near the top of the field, the fovea far right): a left eye.
TRUTH = {
    "IDRiD_04": {"disc": (1985.9, 769.3), "diameter": 483.5, "fovea": None, "laterality": "left"},
    "IDRiD_11": {"disc": (851.4, 1532.4), "diameter": 508.5, "fovea": None, "laterality": "left"},
    "IDRiD_14": {"disc": (1064.9, 1279.4), "diameter": 536.9, "fovea": (2371.0, 1524.0), "laterality": "left"},
}


def peaked(cells: dict[tuple[int, int], float], absent: float = 0.0) -> np.ndarray:
    """A landmark's probabilities [CELLS^2 + 1]: the given (row, col) masses, the rest spread evenly."""
    p = np.zeros(CELLS * CELLS + 1)
    for (r, c), v in cells.items():
        p[r * CELLS + c] = v
    p[-1] = absent
    rest = 1.0 - p.sum()
    p[:-1] += rest / (CELLS * CELLS)
    return p


def test_decode_peak_and_subcell_location():
    (x, y), conf, absent = decode_landmarks(peaked({(5, 7): 1.0}))
    assert (x, y) == pytest.approx((7.5 * CELL - 0.5, 5.5 * CELL - 0.5)) and conf == pytest.approx(1.0)
    (x, y), conf, _ = decode_landmarks(peaked({(5, 7): 0.4, (5, 8): 0.4}))
    assert x == pytest.approx(8.0 * CELL - 0.5, abs=0.5) and conf == pytest.approx(0.8, abs=0.01)
    (_, _), conf, absent = decode_landmarks(peaked({(3, 3): 0.1}, absent=0.85))
    assert conf < 0.2 and absent == pytest.approx(0.85)


def test_anatomy_vector_round_trip():
    a = Anatomy(100.5, 200.25, 98.0, 0.9, FOUND, math.nan, math.nan, 0.1, OUTSIDE)
    v = a.to_vector()
    assert v.shape == (ANATOMY_LENGTH,) and v.dtype == np.float32
    b = Anatomy.from_vector(v)
    assert b.disc_x == 100.5 and b.fovea_reason == OUTSIDE and math.isnan(b.fovea_x) and b.has_disc
    with pytest.raises(ValueError):
        Anatomy.from_vector(np.zeros(ANATOMY_LENGTH + 1))


def test_plausible_pairs():
    disc = (500.0, 300.0)
    assert plausible(disc, (255.0, 330.0), 98.0)  # right eye: fovea 2.5 DD left, slightly below
    assert plausible((140.0, 300.0), (385.0, 330.0), 98.0)  # left eye
    assert not plausible(disc, (450.0, 300.0), 98.0)  # half a disc diameter away
    assert not plausible(disc, (300.0, 100.0), 98.0)  # far above the disc


def _pixels() -> np.ndarray:
    return np.zeros((3, WORKING_SIZE, WORKING_SIZE), np.float32)


def test_null_paths():
    disc_at = peaked({(10, 16): 0.9})  # (x, y) ~ (527.5, 335.5)
    fovea_at = peaked({(10, 8): 0.9})  # 256 px to the left: a right eye
    a = anatomy_from_probability(np.stack([disc_at, fovea_at]), _pixels())
    assert a.has_disc and a.has_fovea and a.disc_diameter > 0
    # Not confident: NaN with the reason; the disc diameter goes with the disc.
    a = anatomy_from_probability(np.stack([peaked({(10, 16): 0.1}), fovea_at]), _pixels())
    assert a.disc_reason == NO_DISC and math.isnan(a.disc_x) and math.isnan(a.disc_diameter) and a.has_fovea
    # The network puts its mass on "absent": outside the field of view.
    a = anatomy_from_probability(np.stack([disc_at, peaked({(10, 8): 0.05}, absent=0.9)]), _pixels())
    assert a.fovea_reason == OUTSIDE and REASONS[a.fovea_reason].startswith("outside")
    # A fovea right next to the disc: the less confident of the two is dropped.
    a = anatomy_from_probability(np.stack([disc_at, peaked({(10, 15): 0.6})]), _pixels())
    assert a.has_disc and a.fovea_reason == IMPLAUSIBLE


def test_disc_diameter_on_a_synthetic_disc():
    pixels = np.full((3, WORKING_SIZE, WORKING_SIZE), 0.35, np.float32)
    for c in range(3):
        cv2.circle(pixels[c], (400, 300), 50, 0.85, -1)  # 100 px wide bright disc
    for y in (280, 310):  # vessels crossing it
        pixels[:, y - 3:y + 3, 300:500] = 0.2
    assert disc_diameter(pixels, 403.0, 298.0) == pytest.approx(100.0, rel=0.08)
    # Nothing to measure: the prior.
    assert disc_diameter(np.full_like(pixels, 0.3), 320.0, 320.0) == DISC_DIAMETER_PRIOR


@pytest.fixture(scope="module")
def detector() -> AnatomyDetector:
    return AnatomyDetector(MODEL_PATH, threads=1)


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_detector_on_real_photos(detector, name):
    pre = preprocess((SAMPLES / f"{name}.jpg").read_bytes())
    lm = Landmarks.from_anatomy(detector.detect(pre.pixels[None])[0], pre.geometry, WORKING_SIZE)
    truth = TRUTH[name]
    assert lm.disc is not None, lm.disc_reason
    assert math.dist(lm.disc, truth["disc"]) <= 0.5 * truth["diameter"]
    assert lm.disc_diameter_px == pytest.approx(truth["diameter"], rel=0.35)
    if truth["fovea"]:
        assert lm.fovea is not None and math.dist(lm.fovea, truth["fovea"]) <= truth["diameter"]
    assert lm.laterality == truth["laterality"]


def no_disc_fundus(blobs: tuple[tuple[int, int, int], ...] = ()) -> np.ndarray:
    """A photo without a visible disc (BGR): a uniformly lit orange retina with vessel-like lines and dark
    'haemorrhage' blobs (x, y, r)."""
    rng = np.random.default_rng(0)
    img = np.zeros((1400, 1800, 3), np.uint8)
    cv2.circle(img, (900, 700), 680, (30, 80, 180), -1)
    for _ in range(12):
        p = rng.integers(300, 1500, 4)
        cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3] // 1.3)), (20, 40, 120), 6)
    for x, y, r in blobs:
        cv2.circle(img, (x, y), r, (20, 25, 90), -1)
    return np.clip(img + rng.normal(0, 4, img.shape) * (img > 0), 0, 255).astype(np.uint8)


def test_no_visible_disc_is_null(detector):
    pre = preprocess(cv2.imencode(".jpg", no_disc_fundus())[1].tobytes())
    a = detector.detect(pre.pixels[None])[0]
    assert not a.has_disc and REASONS[a.disc_reason]
    lm = Landmarks.from_anatomy(a, pre.geometry, WORKING_SIZE)
    assert lm.frame() is None and lm.disc is None and lm.disc_diameter_px is None


def test_batch_answers_each_photo_on_its_own(detector):
    """Its cost (~2-3 ms a photo on one free core) is measured by fundus_hemorrhage_training/evaluate_anatomy.py
    (fundus_hemorrhage_perf/results/anatomy-eval.md), not asserted on a shared test machine."""
    pre = preprocess((SAMPLES / "IDRiD_14.jpg").read_bytes())
    batch = np.repeat(pre.pixels[None], 4, axis=0)
    out = detector(batch)
    assert out.shape == (4, ANATOMY_LENGTH) and out.dtype == np.float32
    assert np.allclose(out, out[:1], equal_nan=True)  # each photo on its own
    assert np.allclose(detector(pre.pixels[None]), out[:1], equal_nan=True)  # alone, as in a batch of four


def test_training_augmentation_keeps_landmarks_on_their_pixels():
    torch = pytest.importorskip("torch")
    from fundus_hemorrhage_training.anatomy_data import CACHE_SIZE
    from fundus_hemorrhage_training.train_anatomy import CELL, NET_SIZE, augment, targets

    k = CACHE_SIZE / WORKING_SIZE
    img = np.zeros((CACHE_SIZE, CACHE_SIZE, 3), np.uint8)
    cv2.circle(img, (CACHE_SIZE // 2, CACHE_SIZE // 2), CACHE_SIZE // 2 - 4, (120, 60, 30), -1)
    disc, fovea = np.array([500.0, 310.0]), np.array([250.0, 340.0])  # working pixels
    cv2.circle(img, tuple(int(round((v + 0.5) * k - 0.5)) for v in disc), 12, (255, 255, 255), -1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, cells = augment(rng, img, disc.astype(np.float32), fovea.astype(np.float32), p_recentre=0.0)
        assert x.shape == (3, NET_SIZE, NET_SIZE) and x.max() > 0.5  # not blank
        dx, dy = cells[0] * CELL - 0.5  # back to network pixels
        assert x[:, int(round(dy)), int(round(dx))].min() > 0.6  # the disc label sits on the bright disc
    t = targets(torch.tensor([[[10.0, 10.0], [float("nan"), float("nan")]]]))
    assert float(t[0, 0, :-1].sum()) == pytest.approx(1.0) and float(t[0, 1, -1]) == 1.0
