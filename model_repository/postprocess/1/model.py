"""Triton adapter for fundus_hemorrhage.steps.answer_photos:
PROBABILITY, THRESHOLD, MODEL_VERSION, GEOMETRY, ERROR, ANATOMY, QUALITY -> MASK, LESIONS, PROBABILITY_PNG per photo.

Each photo is thresholded at the THRESHOLD that came with its probabilities, and its report names the
MODEL_VERSION that produced them: nothing is looked up on disk. PROBABILITY_PNG is computed only when the request
carries the parameter `probability` = true; otherwise it is an empty string. MASK is empty when the parameter
`mask` is false (a client that asked for LESIONS only: no full-size PNG encoded). ANATOMY (the optic disc and fovea
that preprocess found on the working grid) places the lesions in the retinal frame (report schema 2.0). QUALITY
(the image-quality verdict, JSON) makes an ungradable photo's answer an empty mask and status "ungradable".
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.backend import model_config_and_parameters
from fundus_hemorrhage.backend.cancellation import cancelled_response
from fundus_hemorrhage.backend.metrics import LesionMetrics
from fundus_hemorrhage.postprocessing import PostprocessConfig
from fundus_hemorrhage.routing import request_parameters
from fundus_hemorrhage.steps import answer_photos


def wanted_outputs(request) -> tuple[bool, bool]:
    """The request's `probability` (default false) and `mask` (default true) parameters (unet_router, the
    ensemble's earlier step, has refused bad ones)."""
    params = request_parameters(request.parameters())
    return params.get(c.PROBABILITY_PARAMETER, False), params.get(c.MASK_PARAMETER, True)


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config, params = model_config_and_parameters(args)
        self.config = PostprocessConfig(min_lesion_working_px=float(params["min_lesion_working_px"]))
        self.pool = ThreadPoolExecutor(int(params["threads"]))  # the photos of a request at once (contract)
        self.lesion_metrics = LesionMetrics()  # per-version lesion count and area histograms on /metrics

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = [pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                      for name in (c.PROBABILITY, c.THRESHOLD, c.MODEL_VERSION, c.GEOMETRY, c.ANATOMY)]
            errors, quality = (pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
                               for name in (c.ERROR, c.QUALITY))
            cancelled = cancelled_response(request, "postprocess", len(errors), self.logger.log_info)
            if cancelled is not None:  # the client is gone: no masks or reports encoded for nobody
                responses.append(cancelled)
                continue
            with_probability, with_mask = wanted_outputs(request)
            results = answer_photos(*inputs, [e.decode() for e in errors], quality, self.config, with_probability,
                                    self.pool, self.logger.log_error, with_mask)
            masks, reports, probabilities = zip(*((r.mask_png, r.report, r.probability_png) for r in results))
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
