# This version runs model.onnx (beside this file) on ONNX Runtime; the adapter is the installed package's.
from fundus_hemorrhage.onnxruntime_unet import TritonPythonModel  # noqa: F401
