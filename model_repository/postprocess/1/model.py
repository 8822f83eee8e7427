"""Triton adapter for fundus_hemorrhage.postprocessing:
PROBABILITY, THRESHOLD, MODEL_VERSION, GEOMETRY, ERROR, ANATOMY, QUALITY -> MASK, LESIONS, PROBABILITY_PNG per photo.

Each photo is thresholded at the THRESHOLD that came with its probabilities, and its report names the
MODEL_VERSION that produced them: nothing is looked up on disk. PROBABILITY_PNG is computed only when the request
carries the parameter `probability` = true; otherwise it is an empty string. ANATOMY (the optic disc and fovea
that preprocess found on the working grid) places the lesions in the retinal frame (report schema 2.0). QUALITY
(the image-quality verdict, JSON) makes an ungradable photo's answer an empty mask and status "ungradable".
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.anatomy_tensor import Anatomy
from fundus_hemorrhage.geometry import Geometry
from fundus_hemorrhage.backend.metrics import LesionMetrics
from fundus_hemorrhage.postprocessing import PostprocessConfig, postprocess
from fundus_hemorrhage.quality import QualityAssessment
from fundus_hemorrhage.report import error_report


def wants_probability(request) -> bool:
    value = json.loads(request.parameters() or "{}").get(c.PROBABILITY_PARAMETER, False)
    return value is True or str(value).lower() in ("true", "1", "yes")


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        self.config = PostprocessConfig(min_lesion_working_px=float(
            params.get("min_lesion_working_px", PostprocessConfig.min_lesion_working_px)))
        # The photos of one request are postprocessed in parallel (OpenCV and zlib release the GIL).
        self.pool = ThreadPoolExecutor(int(params.get("threads", "2")))
        self.lesion_metrics = LesionMetrics()  # per-version lesion count and area histograms on /metrics

    def _one(self, i, probability, threshold, version, geometry, anatomy, error, quality, with_probability):
        """(mask PNG, report, probability PNG) for photo i; never raises."""
        error = error.decode() if isinstance(error, bytes) else str(error)
        if error:
            return b"", error_report(i, error), b""
        try:
            result = postprocess(probability, Geometry.from_vector(geometry), float(threshold[0]), int(version[0]),
                                 self.config, with_probability, Anatomy.from_vector(anatomy),
                                 QualityAssessment.from_json(quality))
        except Exception as exc:  # never let one photo fail the request
            self.logger.log_error(f"postprocess: image {i} failed: {exc!r}")
            return b"", error_report(i, f"image {i}: postprocessing failed ({type(exc).__name__})"), b""
        result.report["image_index"] = i
        return result.mask_png, result.report, result.probability_png

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = [pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                      for name in (c.PROBABILITY, c.THRESHOLD, c.MODEL_VERSION, c.GEOMETRY, c.ANATOMY)]
            errors = pb_utils.get_input_tensor_by_name(request, c.ERROR).as_numpy().reshape(-1)
            quality = pb_utils.get_input_tensor_by_name(request, c.QUALITY).as_numpy().reshape(-1)
            with_probability = wants_probability(request)
            masks, reports, probabilities = zip(*self.pool.map(
                lambda i: self._one(i, *(x[i] for x in inputs), errors[i], quality[i], with_probability),
                range(len(errors))))
            for report in reports:
                self.lesion_metrics.record(report)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(c.MASK, np.array(masks, dtype=np.object_).reshape(-1, 1)),
                pb_utils.Tensor(c.LESIONS, np.array([json.dumps(r).encode() for r in reports],
                                                    dtype=np.object_).reshape(-1, 1)),
                pb_utils.Tensor(c.PROBABILITY_PNG, np.array(probabilities, dtype=np.object_).reshape(-1, 1)),
            ]))
        return responses

    def finalize(self):
        self.pool.shutdown()
