"""The ensemble's middle step: picks the unet version for each request and calls it (BLS).

PIXELS [N,3,S,S] -> PROBABILITY [N,1,S,S], THRESHOLD [N,1], MODEL_VERSION [N,1], exactly what unet returns (the
version's identity comes from its own graph, so postprocess thresholds and names it correctly).

Per request, all its photos go to one version (fundus_hemorrhage.routing; every request parameter is checked
first, a bad or unknown one is refused with INVALID_ARG naming it): the request parameter `unet_version` pins it (a version unet does not serve is refused, INVALID_ARG, naming it and the served versions); else
`routing_key` (sticky); else a random draw by the config parameter `traffic` ("3:90,2:10"); with no traffic, the
newest loaded version. The split is read once, in initialize: a new split is applied by loading this model again
with the new config (python -m fundus_hemorrhage_ops.serving.traffic), which Triton does without dropping requests.

initialize calls nothing in Triton (no pb_utils.is_model_ready, no BLS): while tritonserver 2.51 is starting,
is_model_ready fails ("Server not ready") and the Python backend's handling of that failure made tritonserver abort
with boost::interprocess::lock_exception in 3 of 5 A/B starts (docs/reliability.md, "A/B start"). That the split's
versions are served is checked by the one who sets the split: serve.py generates unet's version policy and the
router's split from one live state, and applies a changed split only once unet serves every version it names
(fundus_hemorrhage_ops.serving.live). A request routed to a version that is not served gets unet's error, naming it.

Shadow mode (config parameters `shadow_version`, `shadow_rate` in [0, 1]): a sampled share of requests also runs
on the shadow version in a background thread, after the served result is returned; its result is only compared
(fundus_hemorrhage.backend.metrics: Dice, lesion-count difference, its ms). At most one shadow inference is in flight per
router instance; a sampled request finding one in flight is skipped and counted.
"""

import asyncio
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.backend import model_config_and_parameters
from fundus_hemorrhage.backend.metrics import RouterMetrics
from fundus_hemorrhage.model_config import version_numbers
from fundus_hemorrhage.routing import (NEWEST, ParameterError, TrafficError, agreement, choose, parse_traffic,
                                       parse_version, request_parameters)

OUTPUTS = [c.PROBABILITY, c.THRESHOLD, c.MODEL_VERSION]
ROUTING_KEY, UNET_VERSION = c.ROUTING_KEY_PARAMETER, c.UNET_VERSION_PARAMETER


def unet_ready(version: int) -> bool:
    """Whether Triton serves unet `version`. Called from execute only, when Triton is ready and is_model_ready
    answers without failing (its failure path is what aborted tritonserver at start: module docstring)."""
    try:
        return pb_utils.is_model_ready(c.SEGMENTATION_MODEL, str(version))
    except pb_utils.TritonModelException:
        return False


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config_and_parameters(args)
        self.unet_dir = os.path.join(os.path.dirname(args["model_repository"]), c.SEGMENTATION_MODEL)
        try:
            self.split = parse_traffic(params.get("traffic", ""))
            self.shadow_version = parse_version(params["shadow_version"]) if params.get("shadow_version") else None
        except (TrafficError, ValueError) as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        self.shadow_rate = float(params.get("shadow_rate", "0"))
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise pb_utils.TritonModelException(f"shadow_rate {self.shadow_rate} is not in [0, 1]")
        self.min_lesion_working_px = float(params["min_lesion_working_px"])
        # No is_model_ready here (module docstring): serve.py checks that unet serves the split's versions.
        self.rng = random.Random()
        self.metrics = RouterMetrics()
        self.shadow_pool = ThreadPoolExecutor(1) if self.shadow_version and self.shadow_rate > 0 else None
        self.shadow_busy = threading.Lock()
        pb_utils.Logger.log_info(f"unet_router: traffic '{self.split or 'newest'}', shadow "
                                 f"{self.shadow_version or 'none'} at rate {self.shadow_rate}")

    def served_versions(self) -> str:
        """The unet versions READY now (version folders probed with is_model_ready; only on refusals)."""
        candidates = sorted(set(version_numbers(self.unet_dir)) | set(self.split.versions))
        return ", ".join(str(v) for v in candidates if unet_ready(v))

    def route(self, request) -> tuple[int, str, object]:
        """(version or NEWEST, route, None), or (0, "", pb_utils.TritonError INVALID_ARG) for a bad request
        parameter or an unserved pin (TritonError is returned in a response, not raised).

        The router is the first step of the ensemble that reads the request's parameters, so every one is checked
        here (fundus_hemorrhage.routing.request_parameters: `probability` for postprocess too, and unknown names);
        a bad one ends the request with INVALID_ARG naming it, before postprocess sees it. Bytes that are not
        UTF-8 (HTTP JSON is not checked by Triton) make the backend's parameters() raise UnicodeDecodeError: its
        bytes are checked to name the parameter."""
        try:
            raw = request.parameters()
        except UnicodeDecodeError as exc:
            raw = exc.object
        try:
            params = request_parameters(raw)
        except ParameterError as exc:
            message = str(exc)
            if exc.name == UNET_VERSION:
                message += f"; served versions: {self.served_versions() or 'none'}"
            return 0, "", pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
        if UNET_VERSION in params:
            version = params[UNET_VERSION]
            if not unet_ready(version):
                return 0, "", pb_utils.TritonError(
                    f"unet_version {version} is not served; served versions: "
                    f"{self.served_versions() or 'none'}", pb_utils.TritonError.INVALID_ARG)
            return version, "pinned", None
        key = params.get(ROUTING_KEY)
        version = choose(self.split, str(key) if key not in (None, "") else None, self.rng)
        return version, ("newest" if version == NEWEST else "key" if key not in (None, "") else "random"), None

    async def execute(self, requests):
        responses: list = [None] * len(requests)
        groups: dict[int, list[tuple[int, str]]] = {}  # version -> [(request index, route)]
        for i, request in enumerate(requests):
            version, route, error = self.route(request)
            if error is not None:
                responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            groups.setdefault(version, []).append((i, route))
        pixels = [pb_utils.get_input_tensor_by_name(r, c.PIXELS) for r in requests]
        # One BLS call per version (the unet's dynamic batcher sees whole batches); versions run concurrently.
        calls = [self.call(version, members, requests, pixels) for version, members in groups.items()]
        for version, members, result in zip(groups, groups.values(), await asyncio.gather(*calls)):
            for (i, _), response in zip(members, result):
                responses[i] = response
        return responses

    async def call(self, version, members, requests, pixels):
        """BLS to unet `version` for the requests `members`; one InferenceResponse per member."""
        inputs = [pixels[i] for i, _ in members]
        sizes = [t.as_numpy().shape[0] for t in inputs]
        batch = inputs[0] if len(inputs) == 1 else pb_utils.Tensor(
            c.PIXELS, np.concatenate([t.as_numpy() for t in inputs]))
        bls = pb_utils.InferenceRequest(model_name=c.SEGMENTATION_MODEL, model_version=int(version),
                                        requested_output_names=OUTPUTS, inputs=[batch])
        response = await bls.async_exec()
        if response.has_error():
            error = pb_utils.TritonError(f"unet version {version if version != NEWEST else 'newest'}: "
                                         f"{response.error().message()}")
            return [pb_utils.InferenceResponse(error=error) for _ in members]
        tensors = {name: pb_utils.get_output_tensor_by_name(response, name) for name in OUTPUTS}
        outputs = {name: tensor.as_numpy() for name, tensor in tensors.items()}
        served = int(outputs[c.MODEL_VERSION].reshape(-1)[0])
        for (_, route), n in zip(members, sizes):
            self.metrics.route(served, route, n)
        if self.shadow_pool is not None and served != self.shadow_version:
            self.maybe_shadow(served, batch.as_numpy(), outputs)
        if len(members) == 1:  # unet's tensors as they came (as in Triton's BLS example): no copy
            return [pb_utils.InferenceResponse(list(tensors.values()))]
        parts = {name: np.split(array, np.cumsum(sizes)[:-1]) for name, array in outputs.items()}
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, parts[name][k]) for name in OUTPUTS])
                for k in range(len(members))]

    def maybe_shadow(self, served, pixels, outputs):
        """Sample this batch for the shadow version; skip (counted) while one shadow inference is in flight."""
        if self.rng.random() >= self.shadow_rate:
            return
        if not self.shadow_busy.acquire(blocking=False):
            self.metrics.skipped(self.shadow_version)
            return
        # Copies: the request's tensors are released once its response is sent.
        self.shadow_pool.submit(self.shadow, served, pixels.copy(), outputs[c.PROBABILITY].copy(),
                                outputs[c.THRESHOLD].copy())

    def shadow(self, served, pixels, probability, threshold):
        try:
            start = time.perf_counter()
            bls = pb_utils.InferenceRequest(model_name=c.SEGMENTATION_MODEL, model_version=self.shadow_version,
                                            requested_output_names=[c.PROBABILITY, c.THRESHOLD],
                                            inputs=[pb_utils.Tensor(c.PIXELS, pixels)])
            response = bls.exec()
            ms = (time.perf_counter() - start) * 1000.0
            if response.has_error():
                pb_utils.Logger.log_warn(f"unet_router: shadow version {self.shadow_version} failed: "
                                         f"{response.error().message()}")
                return
            shadow_p = pb_utils.get_output_tensor_by_name(response, c.PROBABILITY).as_numpy()
            shadow_t = pb_utils.get_output_tensor_by_name(response, c.THRESHOLD).as_numpy()
            agreements = [agreement(probability[k], float(threshold[k, 0]), shadow_p[k], float(shadow_t[k, 0]),
                                    self.min_lesion_working_px) for k in range(probability.shape[0])]
            self.metrics.shadow(served, self.shadow_version, agreements, ms)
        except Exception as exc:  # a shadow must never disturb serving
            pb_utils.Logger.log_warn(f"unet_router: shadow comparison failed: {exc!r}")
        finally:
            self.shadow_busy.release()

    def finalize(self):
        if self.shadow_pool is not None:
            self.shadow_pool.shutdown(wait=True)
