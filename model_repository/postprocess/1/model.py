"""Triton adapter for postprocess_backend: PROBABILITY, GEOMETRY, ERROR -> MASK, LESIONS, PROBABILITY_PNG.

PROBABILITY_PNG is computed only when the request carries the parameter `probability` = true; otherwise it is
an empty string. The report names the segmentation model version it came from and uses that version's
threshold (unet/<version>/model.json).
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from postprocess_backend import PostprocessConfig, error_report, postprocess
from preprocess_backend import Geometry


def wants_probability(request) -> bool:
    value = json.loads(request.parameters() or "{}").get("probability", False)
    return value is True or str(value).lower() in ("true", "1", "yes")


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        self.model_name = params.get("segmentation_model", "unet")
        self.model_dir = os.path.join(os.path.dirname(args["model_repository"]), self.model_name)
        self.min_lesion_working_px = float(params.get("min_lesion_working_px", PostprocessConfig.min_lesion_working_px))
        self._metadata_cache = {}
        # The photos of one request are postprocessed in parallel (OpenCV and zlib release the GIL).
        self.pool = ThreadPoolExecutor(int(params.get("threads", "2")))

    def _served_version(self):
        """Newest version folder of the segmentation model that Triton reports ready, and its metadata."""
        versions = sorted((int(d) for d in os.listdir(self.model_dir) if d.isdigit()), reverse=True)
        for version in versions:
            ready = getattr(pb_utils, "is_model_ready", None)
            if ready is None or ready(self.model_name, str(version)):
                break
        else:
            version = versions[0] if versions else 0
        if version not in self._metadata_cache:
            path = os.path.join(self.model_dir, str(version), "model.json")
            try:
                with open(path) as f:
                    self._metadata_cache[version] = json.load(f)
            except (OSError, ValueError) as exc:
                self.logger.log_warn(f"postprocess: no metadata for {self.model_name} v{version} ({exc}); threshold 0.5")
                self._metadata_cache[version] = {}
        return version, self._metadata_cache[version]

    def _one(self, i, probability, geometry, error, config, version, with_probability):
        """(mask PNG, report, probability PNG) for photo i; never raises."""
        error = error.decode() if isinstance(error, bytes) else str(error)
        if error:
            return b"", error_report(i, error), b""
        try:
            result = postprocess(probability, Geometry.from_vector(geometry), config, self.model_name, str(version),
                                 with_probability)
        except Exception as exc:  # never let one photo fail the request
            self.logger.log_error(f"postprocess: image {i} failed: {exc!r}")
            return b"", error_report(i, f"image {i}: postprocessing failed ({type(exc).__name__})"), b""
        result.report["image_index"] = i
        return result.mask_png, result.report, result.probability_png

    def execute(self, requests):
        version, metadata = self._served_version()
        config = PostprocessConfig(threshold=float(metadata.get("threshold", 0.5)),
                                   min_lesion_working_px=self.min_lesion_working_px)
        responses = []
        for request in requests:
            probability = pb_utils.get_input_tensor_by_name(request, "PROBABILITY").as_numpy()
            geometry = pb_utils.get_input_tensor_by_name(request, "GEOMETRY").as_numpy()
            errors = pb_utils.get_input_tensor_by_name(request, "ERROR").as_numpy().reshape(-1)
            with_probability = wants_probability(request)
            masks, reports, probabilities = zip(*self.pool.map(
                lambda i: self._one(i, probability[i], geometry[i], errors[i], config, version, with_probability),
                range(probability.shape[0])))
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("MASK", np.array(masks, dtype=np.object_).reshape(-1, 1)),
                pb_utils.Tensor("LESIONS", np.array([json.dumps(r).encode() for r in reports],
                                                    dtype=np.object_).reshape(-1, 1)),
                pb_utils.Tensor("PROBABILITY_PNG", np.array(probabilities, dtype=np.object_).reshape(-1, 1)),
            ]))
        return responses

    def finalize(self):
        self.pool.shutdown()
