"""Checkpoint -> ONNX now lives in fundus_hemorrhage.engines.export, beside the rest of build_engines' steps.

This name stays only until perf/fastapi_baseline.py imports load_model from there; then delete this file.
"""

from fundus_hemorrhage.engines.export import OPSET, export_onnx, load_model, model_metadata  # noqa: F401
