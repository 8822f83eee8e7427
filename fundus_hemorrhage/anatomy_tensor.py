"""The ANATOMY tensor between the ensemble's steps: one photo's optic disc and fovea on the working grid.

Preprocess writes it (fundus_hemorrhage.anatomy's detector), postprocess reads it. The vector layout is the order
of `Anatomy`'s fields; `ANATOMY_LENGTH` and the config.pbtxt dims derive from it. Kept apart from the detector so
that the contract can import the layout without importing the detector (which imports the contract).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .tensor_row import TensorRow

REASONS = (
    "",  # 0: found
    "not confident: no optic disc recognisable in the photo",  # 1
    "not confident: no fovea recognisable in the photo",  # 2
    "outside the field of view (the photo is not centred where this landmark can be seen)",  # 3
    "implausible position relative to the optic disc (distance or angle out of the anatomical range)",  # 4
    "detector not available",  # 5
)
FOUND, NO_DISC, NO_FOVEA, OUTSIDE, IMPLAUSIBLE, UNAVAILABLE = range(len(REASONS))


@dataclass(frozen=True)
class Anatomy(TensorRow):
    """One photo's landmarks on the working grid (pixels of contract.WORKING_SIZE); NaN where not found.

    `disc_reason` / `fovea_reason` index REASONS (0: found). Confidences are in [0, 1] even when not found.
    `disc_diameter` is NaN exactly when the disc is not found.
    """

    ROW_DTYPE = np.float32  # one row of the ANATOMY tensor

    disc_x: float
    disc_y: float
    disc_diameter: float
    disc_confidence: float
    disc_reason: int
    fovea_x: float
    fovea_y: float
    fovea_confidence: float
    fovea_reason: int

    @classmethod
    def unavailable(cls) -> "Anatomy":
        nan = math.nan
        return cls(nan, nan, nan, 0.0, UNAVAILABLE, nan, nan, 0.0, UNAVAILABLE)

    @property
    def has_disc(self) -> bool:
        return self.disc_reason == FOUND

    @property
    def has_fovea(self) -> bool:
        return self.fovea_reason == FOUND


ANATOMY_FIELDS = Anatomy.row_fields()
ANATOMY_LENGTH = len(ANATOMY_FIELDS)
