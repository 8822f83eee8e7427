"""Triton adapter for fundus_hemorrhage.visits: two visits of one eye -> both answers and the change report.

BASELINE [N,1], FOLLOW_UP [N,1] photo bytes (N <= contract.MAX_PAIRS) -> BASELINE_MASK, FOLLOW_UP_MASK [N,1] PNG,
BASELINE_LESIONS, FOLLOW_UP_LESIONS [N,1] JSON (the ensemble's single-visit reports), CHANGE_REPORT [N,1] JSON
(fundus_hemorrhage.progression).

The 2N photos go to the ensemble `hemorrhage_segmentation` in one BLS request (so both visits are segmented by the
same unet version, whatever the A/B split); while it runs, the pairs are registered in this stub's threads
(fundus_hemorrhage.registration). Errors are data, as in the ensemble: a pair that cannot be compared gets a
refused change report with its reason. A request that is wrong as a whole (BASELINE and FOLLOW_UP of different
lengths) is refused with INVALID_ARG; an ensemble failure fails the request with the ensemble's message.
initialize calls nothing in Triton (as unet_router: Triton calls made while the server starts can abort it).
"""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.backend import model_config_and_parameters
from fundus_hemorrhage.report import PhotoResult, error_report
from fundus_hemorrhage.visits import answer_pairs, pair_photos, register_pairs


def _bytes_column(values) -> np.ndarray:
    return np.array(list(values), dtype=np.object_).reshape(-1, 1)


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config_and_parameters(args)
        self.pool = ThreadPoolExecutor(int(params["threads"]))
        self.log = pb_utils.Logger.log_error

    async def execute(self, requests):
        return [await self.answer(request) for request in requests]

    async def answer(self, request):
        baselines, follow_ups = (list(pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1))
                                 for name in (c.BASELINE, c.FOLLOW_UP))
        try:
            photos = pair_photos(baselines, follow_ups)
        except ValueError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        # PROBABILITY too: the change report's hysteresis reads each visit's probability under the other's lesions.
        bls = pb_utils.InferenceRequest(model_name=c.ENSEMBLE, requested_output_names=[c.MASK, c.LESIONS, c.PROBABILITY],
                                        inputs=[pb_utils.Tensor(c.IMAGE, _bytes_column(photos))],
                                        parameters={c.PROBABILITY_PARAMETER: True})
        loop = asyncio.get_running_loop()
        registering = loop.run_in_executor(None, register_pairs, baselines, follow_ups, self.pool, self.log)
        segmented, registrations = await asyncio.gather(bls.async_exec(), registering)
        if segmented.has_error():
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"{c.ENSEMBLE}: {segmented.error().message()}"))
        masks, reports, probabilities = (pb_utils.get_output_tensor_by_name(segmented, name).as_numpy().reshape(-1)
                                         for name in (c.MASK, c.LESIONS, c.PROBABILITY))
        results = []
        for k, (mask, raw, probability) in enumerate(zip(masks, reports, probabilities)):
            try:
                results.append(PhotoResult(bytes(mask), json.loads(raw), bytes(probability)))
            except ValueError:
                results.append(PhotoResult(b"", error_report(k, "malformed lesion report from the ensemble")))
        answers = await loop.run_in_executor(None, answer_pairs, results, registrations, self.pool, self.log)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(c.BASELINE_MASK, _bytes_column(a.baseline.mask_png for a in answers)),
            pb_utils.Tensor(c.FOLLOW_UP_MASK, _bytes_column(a.follow_up.mask_png for a in answers)),
            pb_utils.Tensor(c.BASELINE_LESIONS, _bytes_column(json.dumps(a.baseline.report).encode() for a in answers)),
            pb_utils.Tensor(c.FOLLOW_UP_LESIONS, _bytes_column(json.dumps(a.follow_up.report).encode()
                                                               for a in answers)),
            pb_utils.Tensor(c.CHANGE_REPORT, _bytes_column(json.dumps(a.change_report).encode() for a in answers)),
        ])

    def finalize(self):
        self.pool.shutdown()
