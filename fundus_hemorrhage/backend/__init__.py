"""Glue for Triton's Python backend (imports triton_python_backend_utils, so only inside a model's stub):

    unet_model  the TritonPythonModel every unet version's model.py imports (ONNX Runtime)
    metrics     the custom Prometheus metrics of the Python-backend models
"""

import json


def model_config_and_parameters(args: dict) -> tuple[dict, dict[str, str]]:
    """(model config, its `parameters` as {key: string value}) from the `args` Triton passes to `initialize`
    (model_config is JSON there; every parameter a string_value, as model_config.py writes it)."""
    model_config = json.loads(args["model_config"])
    return model_config, {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
