"""Triton adapter for fundus_hemorrhage.preprocessing: IMAGE [N, 1] bytes -> PIXELS, GEOMETRY, ERROR, QUALITY per
photo, and ANATOMY: the optic disc and fovea on the working grid (fundus_hemorrhage.anatomy), one detector call on
the request's readable, gradable photos.

QUALITY is the image-quality gate's verdict as JSON (fundus_hemorrhage.quality.QualityAssessment.to_json): an
ungradable photo gets zero PIXELS and is answered by postprocess with status "ungradable" (not an error).

A photo that cannot be read gets zero PIXELS and its reason in ERROR, so that the others in the same
request are still processed; a request in which no photo can be read fails with INVALID_ARG, and so does a
request whose photos together exceed the request byte limit (serve.py --max-request-bytes, passed as the
environment variable HEMOSEG_MAX_REQUEST_BYTES; default max_batch_size x max_bytes).
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.anatomy import AnatomyDetector, anatomy_rows
from fundus_hemorrhage.preprocessing import ImageError, PreprocessConfig, preprocess


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        pixels_config = pb_utils.get_output_config_by_name(model_config, c.PIXELS)
        self.working_size = int(pixels_config["dims"][-1])
        self.config = PreprocessConfig(
            working_size=self.working_size,
            max_bytes=int(params.get("max_bytes", PreprocessConfig.max_bytes)),
            max_pixels=int(params.get("max_pixels", PreprocessConfig.max_pixels)),
        )
        self.max_request_bytes = int(os.environ.get("HEMOSEG_MAX_REQUEST_BYTES") or params.get("max_request_bytes")
                                     or max(1, int(model_config.get("max_batch_size", 1))) * self.config.max_bytes)
        # The photos of one request are decoded in parallel (OpenCV releases the GIL): one 10-photo request
        # then uses every core, not one.
        self.pool = ThreadPoolExecutor(int(params.get("threads", "2")))
        self.dtypes = {name: pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(model_config, name)["data_type"])
            for name in (c.PIXELS, c.GEOMETRY, c.ANATOMY)}
        # One ONNX Runtime thread: ~3 ms a photo (fundus_hemorrhage_perf/results/anatomy-eval.md); the instances are the parallelism.
        self.anatomy = AnatomyDetector(threads=1)

    def _one(self, index, data):
        """(pixels, geometry vector, error text, quality verdict or None) for one photo; never raises."""
        try:
            if not isinstance(data, bytes):
                raise ImageError(f"expected image bytes, got {type(data).__name__}")
            result = preprocess(data, self.config)
            return result.pixels, result.geometry.to_vector(), "", result.quality
        except ImageError as exc:
            reason = str(exc)
        except Exception as exc:  # a bug or an exotic file must not take the neighbours down
            self.logger.log_error(f"preprocess: unexpected failure on image {index}: {exc!r}")
            reason = f"could not be processed ({type(exc).__name__})"
        zeros = np.zeros((3, self.working_size, self.working_size), np.float32)
        return zeros, np.zeros(c.GEOMETRY_LENGTH), f"image {index}: {reason}", None

    def _anatomy(self, pixels):
        """ANATOMY [N, ANATOMY_LENGTH]; a detector failure leaves the landmarks unknown, never fails the photos."""
        try:
            return anatomy_rows(self.anatomy, pixels)
        except Exception as exc:
            self.logger.log_error(f"preprocess: optic disc and fovea detector failed: {exc!r}")
            return anatomy_rows(None, pixels)

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
            pixels, geometry, errors, verdicts = zip(*self.pool.map(self._one, range(len(images)), images))
            if all(errors):
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("; ".join(errors), pb_utils.TritonError.INVALID_ARG)))
                continue
            anatomy = self._anatomy([p if v is not None and v.gradable else None for p, v in zip(pixels, verdicts)])
            quality = [b"" if v is None else v.to_json() for v in verdicts]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(c.PIXELS, np.stack(pixels).astype(self.dtypes[c.PIXELS], copy=False)),
                pb_utils.Tensor(c.GEOMETRY, np.stack(geometry).astype(self.dtypes[c.GEOMETRY], copy=False)),
                pb_utils.Tensor(c.ERROR, np.array(errors, dtype=np.object_).reshape(-1, 1)),
                pb_utils.Tensor(c.ANATOMY, anatomy.astype(self.dtypes[c.ANATOMY], copy=False)),
                pb_utils.Tensor(c.QUALITY, np.array(quality, dtype=np.object_).reshape(-1, 1)),
            ]))
        return responses

    def finalize(self):
        self.pool.shutdown()
