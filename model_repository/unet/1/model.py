# This version runs model.onnx (beside this file) on ONNX Runtime; the adapter is the installed package's.
from fundus_hemorrhage.backend.unet_model import TritonPythonModel  # noqa: F401
