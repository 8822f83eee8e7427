"""Pure preprocessing logic for the Triton `preprocess` model and for training."""

from .preprocessing import (
    FieldOfView,
    Geometry,
    ImageError,
    Preprocessed,
    PreprocessConfig,
    decode,
    find_field_of_view,
    preprocess,
    preprocess_decoded,
    to_working,
    working_fov_mask,
)

__all__ = [
    "FieldOfView", "Geometry", "ImageError", "Preprocessed", "PreprocessConfig", "decode",
    "find_field_of_view", "preprocess", "preprocess_decoded", "to_working", "working_fov_mask",
]
