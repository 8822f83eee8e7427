"""Triton adapter for fundus_hemorrhage.steps.read_photos: IMAGE [N, 1] bytes -> PIXELS, GEOMETRY, ERROR, QUALITY
per photo, and ANATOMY: the optic disc and fovea on the working grid (fundus_hemorrhage.anatomy), one detector call
on the request's readable, gradable photos.

QUALITY is the image-quality gate's verdict as JSON (fundus_hemorrhage.quality.QualityAssessment.to_json): an
ungradable photo gets zero PIXELS and is answered by postprocess with status "ungradable" (not an error).

A photo that cannot be read gets zero PIXELS and its reason in ERROR, so that the others in the same
request are still processed, and a request in which no photo can be read is answered photo by photo too. Only a
request whose photos together exceed the request byte limit fails as a whole, with INVALID_ARG
(fundus_hemorrhage.preprocessing.max_request_bytes: serve.py --max-request-bytes, or max_batch_size x max_bytes).
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.backend import model_config_and_parameters
from fundus_hemorrhage.anatomy import AnatomyDetector
from fundus_hemorrhage.preprocessing import PreprocessConfig, max_request_bytes
from fundus_hemorrhage.steps import read_photos


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config, params = model_config_and_parameters(args)
        pixels_config = pb_utils.get_output_config_by_name(model_config, c.PIXELS)
        self.working_size = int(pixels_config["dims"][-1])
        self.config = PreprocessConfig(
            working_size=self.working_size,
            max_bytes=int(params["max_bytes"]),
            max_pixels=int(params["max_pixels"]),
        )
        self.max_request_bytes = max_request_bytes(int(model_config.get("max_batch_size", 1)), self.config.max_bytes)
        self.pool = ThreadPoolExecutor(int(params["threads"]))  # the photos of a request at once (contract)
        self.dtypes = {name: pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(model_config, name)["data_type"])
            for name in (c.PIXELS, c.GEOMETRY, c.ANATOMY)}
        # One ONNX Runtime thread: ~3 ms a photo (fundus_hemorrhage_perf/results/anatomy-eval.md); the instances are the parallelism.
        self.anatomy = AnatomyDetector(threads=1)

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, c.IMAGE).as_numpy().reshape(-1)
            total = sum(len(data) for data in images if isinstance(data, bytes))
            if total > self.max_request_bytes:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"request carries {total} bytes of images ({len(images)} photos), over the limit of "
                    f"{self.max_request_bytes} bytes per request", pb_utils.TritonError.INVALID_ARG)))
                continue
            batch = read_photos(images, self.config, self.pool, self.anatomy, self.logger.log_error)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(c.PIXELS, batch.pixels.astype(self.dtypes[c.PIXELS], copy=False)),
                pb_utils.Tensor(c.GEOMETRY, batch.geometry.astype(self.dtypes[c.GEOMETRY], copy=False)),
                pb_utils.Tensor(c.ERROR, np.array(batch.errors, dtype=np.object_).reshape(-1, 1)),
                pb_utils.Tensor(c.ANATOMY, batch.anatomy.astype(self.dtypes[c.ANATOMY], copy=False)),
                pb_utils.Tensor(c.QUALITY, np.array(batch.quality, dtype=np.object_).reshape(-1, 1)),
            ]))
        return responses

    def finalize(self):
        self.pool.shutdown()
