"""Glue for Triton's Python backend (imports triton_python_backend_utils, so only inside a model's stub):

    unet_model  the TritonPythonModel every unet version's model.py imports (ONNX Runtime)
    metrics     the custom Prometheus metrics of the Python-backend models
"""
