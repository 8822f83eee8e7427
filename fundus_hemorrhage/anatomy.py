"""Optic disc (centre, diameter) and fovea (centre) on the working grid: a pure function of PIXELS.

    PIXELS [N, 3, S, S] float32 (preprocess's output, S = contract.WORKING_SIZE)
      -> detector graph (models/anatomy.onnx; ONNX Runtime via onnx_session): 8x average pooling, a small
         heatmap network, per landmark a softmax over CELLS x CELLS cells + one "absent" cell
      -> `decode_landmarks`: the most probable cell, the centroid of the probability within WINDOW_CELLS of it
         (sub-cell location), and its confidence = the probability mass in that window (the chance, as the
         network sees it, that the landmark lies within ~0.5 disc diameter of the reported point)
      -> disc diameter measured on the pixels around the disc (`disc_diameter`)
      -> `Anatomy` [ANATOMY_LENGTH] float32 per photo: the ANATOMY tensor (layout: anatomy_tensor)

In the service it runs in the preprocess step (`anatomy_rows`: one call on the request's readable photos), and
postprocess turns each row into the report's disc, fovea and retinal frame (fundus_hemorrhage.retinal_frame).

A landmark is reported only when its confidence reaches MIN_CONFIDENCE and the pair is anatomically
plausible (`plausible`); a fovea without a disc needs MIN_FOVEA_CONFIDENCE_WITHOUT_DISC. Otherwise it is NaN
with a reason code (`REASONS`). The network was trained on IDRiD
grading photos (fundus_hemorrhage_training.train_anatomy) and evaluated on the IDRiD segmentation photos (fundus_hemorrhage_training.evaluate_anatomy,
fundus_hemorrhage_perf/results/anatomy-*.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .anatomy_tensor import (ANATOMY_FIELDS, ANATOMY_LENGTH, FOUND, IMPLAUSIBLE, NO_DISC, NO_FOVEA,  # noqa: F401
                             OUTSIDE, REASONS, UNAVAILABLE, Anatomy)
from .contract import WORKING_SIZE

LANDMARKS = ("disc", "fovea")
INPUT_REDUCTION = 8  # the graph pools PIXELS 640 -> 80 before the network (the disc is ~12 px wide there)
CELLS = WORKING_SIZE // INPUT_REDUCTION // 4  # heatmap side, 20: a cell is 32 working px (~0.33 disc diameter)
OUTPUT = "LANDMARK_PROBABILITY"  # the detector graph's output, [N, len(LANDMARKS), CELLS^2 + 1]
MODEL_PATH = Path(__file__).resolve().parent / "models" / "anatomy.onnx"
WINDOW_CELLS = 1  # the location and confidence use the 3 x 3 cells around the most probable one

# Below these the landmark is not reported (tuned on the grading hold-out, see fundus_hemorrhage_perf/results/anatomy-*.md).
MIN_CONFIDENCE = {"disc": 0.35, "fovea": 0.35}
# A fovea without a disc to check it against (`plausible`) must be surer: on disc-centred photos of other cameras
# the network sometimes puts a weak fovea next to a disc it missed.
MIN_FOVEA_CONFIDENCE_WITHOUT_DISC = 0.6
# Disc diameter (working pixels) when it cannot be measured, and the range a measurement must fall in:
# IDRiD's 54 disc masks give 74-119 px on the working grid (median 98); other cameras' fields differ.
DISC_DIAMETER_PRIOR = 0.153 * WORKING_SIZE
DISC_DIAMETER_RANGE = (0.55 * DISC_DIAMETER_PRIOR, 1.6 * DISC_DIAMETER_PRIOR)
# Disc-fovea distance: 2.5 disc diameters (IDRiD 54: 2.15-3.06, median 2.50). Plausible range, in DD:
DISC_FOVEA_DD = 2.5
DISC_FOVEA_RANGE_DD = (1.6, 3.6)
# The fovea lies below the horizontal through the disc by -2..14 degrees (IDRiD, 5-95%, data README); allowed:
FOVEA_ANGLE_RANGE_DEG = (-25.0, 35.0)


def decode_landmarks(probability: np.ndarray) -> tuple[tuple[float, float], float, float]:
    """One landmark's probabilities [CELLS^2 + 1] -> ((x, y) working pixels, confidence, absent probability).

    (x, y) is the probability-weighted centre of the cells within WINDOW_CELLS of the most probable cell;
    confidence is the probability mass in that window.
    """
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    grid, absent = p[:-1].reshape(CELLS, CELLS), float(p[-1])
    r, c = divmod(int(np.argmax(p[:-1])), CELLS)
    r0, r1 = max(0, r - WINDOW_CELLS), min(CELLS, r + WINDOW_CELLS + 1)
    c0, c1 = max(0, c - WINDOW_CELLS), min(CELLS, c + WINDOW_CELLS + 1)
    window = grid[r0:r1, c0:c1]
    mass = float(window.sum())
    ys, xs = np.mgrid[r0:r1, c0:c1]
    cell = WORKING_SIZE / CELLS
    if mass <= 0:
        return ((c + 0.5) * cell - 0.5, (r + 0.5) * cell - 0.5), 0.0, absent
    x = (float((window * xs).sum()) / mass + 0.5) * cell - 0.5  # cell centre -> working pixel coordinates
    y = (float((window * ys).sum()) / mass + 0.5) * cell - 0.5
    return (x, y), mass, absent


def disc_diameter(pixels: np.ndarray, cx: float, cy: float) -> float:
    """The optic disc's diameter (working pixels) around (cx, cy), from the pixels PIXELS [3, S, S] in [0, 1].

    The disc is the bright round area whose rim is the steepest fall of brightness going outwards: on 32 rays
    (vessels first removed by a grey closing), the radius of that fall within DISC_DIAMETER_RANGE / 2; the
    diameter is twice their median (taken at the middle of the fall). Falls back to DISC_DIAMETER_PRIOR when fewer than half the rays find a rim.
    """
    lo, hi = DISC_DIAMETER_RANGE[0] / 2, DISC_DIAMETER_RANGE[1] / 2
    reach = int(math.ceil(hi * 1.15))
    x0, y0 = int(round(cx)) - reach, int(round(cy)) - reach
    side = pixels.shape[-1]
    crop = np.zeros((2 * reach + 1, 2 * reach + 1), np.float32)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(side, x0 + 2 * reach + 1), min(side, y0 + 2 * reach + 1)
    if sx1 <= sx0 or sy1 <= sy0:
        return DISC_DIAMETER_PRIOR
    crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = pixels[:, sy0:sy1, sx0:sx1].mean(axis=0)
    crop = cv2.morphologyEx(crop, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11)))
    crop = cv2.GaussianBlur(crop, (0, 0), 1.5)
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    radii = np.arange(int(lo), int(hi) + 1, dtype=np.float32)
    centre = reach + (cx - round(cx)), reach + (cy - round(cy))
    map_x = (centre[0] + np.cos(angles)[:, None] * radii[None, :]).astype(np.float32)
    map_y = (centre[1] + np.sin(angles)[:, None] * radii[None, :]).astype(np.float32)
    profiles = cv2.remap(crop, map_x, map_y, cv2.INTER_LINEAR)  # [angles, radii]
    fall = profiles[:, :-4] - profiles[:, 4:]  # brightness lost over 4 px outwards
    best = fall.argmax(axis=1)
    strong = fall[np.arange(len(angles)), best] > 0.02
    if strong.sum() < len(angles) // 2:
        return DISC_DIAMETER_PRIOR
    return float(2.0 * (np.median(radii[best[strong]]) + 2.0))


def plausible(disc: tuple[float, float], fovea: tuple[float, float], diameter: float) -> bool:
    """Whether a fovea at `fovea` can belong to a disc at `disc` of `diameter` (working pixels): distance within
    DISC_FOVEA_RANGE_DD disc diameters and the fovea within FOVEA_ANGLE_RANGE_DEG below the horizontal through
    the disc (either side: left or right eye)."""
    dx, dy = fovea[0] - disc[0], fovea[1] - disc[1]
    dd = math.hypot(dx, dy) / diameter
    angle = math.degrees(math.atan2(dy, abs(dx)))
    return (DISC_FOVEA_RANGE_DD[0] <= dd <= DISC_FOVEA_RANGE_DD[1]
            and FOVEA_ANGLE_RANGE_DEG[0] <= angle <= FOVEA_ANGLE_RANGE_DEG[1])


def anatomy_from_probability(probability: np.ndarray, pixels: np.ndarray) -> Anatomy:
    """One photo: the detector's output [len(LANDMARKS), CELLS^2 + 1] and its PIXELS [3, S, S] -> `Anatomy`."""
    (dx, dy), dconf, dabsent = decode_landmarks(probability[0])
    (fx, fy), fconf, fabsent = decode_landmarks(probability[1])
    nan = math.nan
    disc_reason = FOUND if dconf >= MIN_CONFIDENCE["disc"] else (OUTSIDE if dabsent > dconf else NO_DISC)
    fovea_reason = FOUND if fconf >= MIN_CONFIDENCE["fovea"] else (OUTSIDE if fabsent > fconf else NO_FOVEA)
    diameter = disc_diameter(pixels, dx, dy) if disc_reason == FOUND else nan
    if disc_reason == FOUND and fovea_reason == FOUND and not plausible((dx, dy), (fx, fy), diameter):
        # One of the two is wrong; the less confident one goes.
        if fconf <= dconf:
            fovea_reason = IMPLAUSIBLE
        else:
            disc_reason, diameter = IMPLAUSIBLE, nan
    if disc_reason != FOUND and fovea_reason == FOUND and fconf < MIN_FOVEA_CONFIDENCE_WITHOUT_DISC:
        fovea_reason = NO_FOVEA
    if disc_reason != FOUND:
        dx = dy = nan
    if fovea_reason != FOUND:
        fx = fy = nan
    return Anatomy(dx, dy, diameter, round(dconf, 4), disc_reason, fx, fy, round(fconf, 4), fovea_reason)


class AnatomyDetector:
    """The detector graph on an ONNX Runtime session from `onnx_session.create_session`.

    `detector(pixels)`: PIXELS float32 [N, 3, S, S] -> ANATOMY float32 [N, ANATOMY_LENGTH] (rows: `Anatomy`).
    Raises onnxruntime's errors for a missing or unloadable model file.
    """

    def __init__(self, path: str | Path = MODEL_PATH, threads: int = 1):
        from .onnx_session import create_session, run  # onnxruntime only where the detector runs

        self._session, self._run = create_session(path, threads), run

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, len(LANDMARKS), CELLS^2 + 1]."""
        return self._run(self._session, pixels)[OUTPUT]

    def detect(self, pixels: np.ndarray) -> list[Anatomy]:
        probs = self.probabilities(pixels)
        return [anatomy_from_probability(p, x) for p, x in zip(probs, pixels)]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.stack([a.to_vector() for a in self.detect(pixels)]).astype(np.float32)


def anatomy_rows(detector: "AnatomyDetector | None", pixels: Sequence[np.ndarray | None]) -> np.ndarray:
    """The ANATOMY tensor float32 [N, ANATOMY_LENGTH] of a request: one detector call on the stacked PIXELS
    [3, S, S] of its readable photos; `None` (an unreadable photo) or no detector gives `Anatomy.unavailable()`.

    Used by both the Triton preprocess and `pipeline.Pipeline`, so that they call the detector on the same batch.
    Raises what the detector raises (the caller decides; the service then reports the detector unavailable).
    """
    rows = np.tile(Anatomy.unavailable().to_vector(), (len(pixels), 1))
    readable = [i for i, p in enumerate(pixels) if p is not None]
    if detector is not None and readable:
        rows[readable] = detector(np.stack([pixels[i] for i in readable]))
    return rows
