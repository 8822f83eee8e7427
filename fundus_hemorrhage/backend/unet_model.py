"""Triton adapter of the U-Net on ONNX Runtime (CPU), for Triton builds without the onnxruntime backend.

Every unet version folder holds model.onnx (+ model.json, its metadata) and a one-line model.py importing this
class, so a version folder is self-contained apart from this installed package. Dynamic batching hands `execute`
several requests: they run as one ONNX Runtime batch. The graph's own THRESHOLD and MODEL_VERSION outputs
(fundus_hemorrhage_ops.engines.identity) are passed on with the probabilities.
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.backend import model_config_and_parameters
from fundus_hemorrhage.onnx_session import SERVING_THREADS, create_session, run


class TritonPythonModel:
    def initialize(self, args):
        model_config, params = model_config_and_parameters(args)
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        self.session = create_session(path, int(params.get("intra_op_threads", SERVING_THREADS)))
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in model_config["output"]}
        missing = set(self.outputs) - {o.name for o in self.session.get_outputs()}
        if missing:  # a graph without its identity would make postprocess guess the threshold
            raise pb_utils.TritonModelException(f"{path} has no output(s) {sorted(missing)}: rebuild it with "
                                                "build_engines.py")
        # One inference at the largest batch before serving: ONNX Runtime's arena is sized now, not at the first big
        # dynamic batch (the 10-minute soak saw this stub step from 665 to 1154 MiB at ~340 s, then stay flat).
        size = int(model_config["input"][0]["dims"][-1])
        run(self.session, np.zeros((int(model_config["max_batch_size"]), 3, size, size), np.float32))
        pb_utils.Logger.log_info(f"unet v{args['model_version']}: {path} on {self.session.get_providers()}")

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, c.PIXELS).as_numpy() for r in requests]
        splits = np.cumsum([b.shape[0] for b in batches])[:-1]
        try:
            out = run(self.session, batches[0] if len(batches) == 1 else np.concatenate(batches))
        except Exception as exc:
            error = pb_utils.TritonError(f"unet inference failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        parts = {name: np.split(out[name].astype(dtype, copy=False), splits) for name, dtype in self.outputs.items()}
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, parts[name][i]) for name in self.outputs])
                for i in range(len(requests))]
