"""Pure postprocessing logic for the Triton `postprocess` model and for evaluation."""

from .postprocessing import (
    QUADRANTS,
    REPORT_SCHEMA_VERSION,
    PostprocessConfig,
    PostprocessResult,
    encode_png,
    Lesion,
    error_report,
    find_lesions,
    lesion_report,
    min_lesion_area,
    original_fov_mask,
    postprocess,
    probability_to_original,
    threshold_level,
)

__all__ = [
    "QUADRANTS", "REPORT_SCHEMA_VERSION", "PostprocessConfig", "PostprocessResult", "encode_png", "error_report", "find_lesions", "Lesion",
    "lesion_report", "min_lesion_area", "original_fov_mask", "postprocess", "probability_to_original",
    "threshold_level",
]
