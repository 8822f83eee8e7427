"""The U-Net on ONNX Runtime (CPU), for Triton builds without the onnxruntime backend.

Every version folder holds model.onnx (+ model.json, its metadata) and a two-line model.py importing this
class. Dynamic batching hands `execute` several requests: they run as one ONNX Runtime batch.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(model_config, "PROBABILITY")["data_type"])
        self.logger.log_info(f"unet v{args['model_version']}: {path} on {self.session.get_providers()}")

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, "PIXELS").as_numpy() for r in requests]
        sizes = [b.shape[0] for b in batches]
        pixels = batches[0] if len(batches) == 1 else np.concatenate(batches)
        try:
            probability = self.session.run(None, {self.input_name: pixels})[0].astype(self.output_dtype, copy=False)
        except Exception as exc:
            error = pb_utils.TritonError(f"unet inference failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PROBABILITY", part)])
                for part in np.split(probability, np.cumsum(sizes)[:-1])]
