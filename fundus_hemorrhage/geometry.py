"""Where the model's working grid sits on the original photo: the GEOMETRY tensor between the ensemble's steps.

The vector layout is the order of `Geometry`'s fields; `GEOMETRY_LENGTH` and the config.pbtxt dims derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .tensor_row import TensorRow


@dataclass(frozen=True)
class Geometry(TensorRow):
    """Where the working grid sits on the original photo, in original pixels.

    Working pixel centre (u, v) maps to original (square_x0 + (u + 0.5) * s - 0.5, ...), s = square_side / S.
    The FOV is the disc (fov_cx, fov_cy, fov_radius) clipped to the box fov_bbox.
    """

    width: int
    height: int
    square_x0: float
    square_y0: float
    square_side: float
    fov_cx: float
    fov_cy: float
    fov_radius: float
    fov_x0: float
    fov_y0: float
    fov_x1: float
    fov_y1: float
    fov_area: float  # pixels of the detected FOV, at original resolution
    exif_orientation: int = 1

    def working_to_original(self, working_size: int) -> np.ndarray:
        """2x3 affine matrix taking working-grid coordinates to original-photo coordinates."""
        s = self.square_side / working_size
        return np.array([[s, 0.0, self.square_x0 + 0.5 * s - 0.5], [0.0, s, self.square_y0 + 0.5 * s - 0.5]])

    def original_to_working(self, working_size: int) -> np.ndarray:
        """2x3 affine matrix, the inverse of `working_to_original`."""
        return cv2.invertAffineTransform(self.working_to_original(working_size))


GEOMETRY_FIELDS = Geometry.row_fields()
GEOMETRY_LENGTH = len(GEOMETRY_FIELDS)
