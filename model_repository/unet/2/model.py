# This version runs model.onnx (beside this file) on ONNX Runtime; the logic is shared by all versions.
from onnxruntime_model import TritonPythonModel  # noqa: F401
