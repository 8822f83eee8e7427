"""Locust load on the Triton ensemble (contract.ENSEMBLE) with real photographs, over gRPC and HTTP.

    locust -f fundus_hemorrhage_perf/locustfile.py --headless -u 4 -r 4 -t 40s --csv fundus_hemorrhage_perf/results/locust \
        --host http://127.0.0.1:8000 --grpc-url 127.0.0.1:8001 --photos ../shared/data/idrid_he/images --batch 10

Two user classes, equally weighted (pick one by naming it last on the command line, e.g. `... TritonGrpcUser`):
  TritonGrpcUser  tritonclient.grpc, one channel per user; fires locust request events itself
                  (request_type "grpc", name "infer xN").
  TritonHttpUser  locust's FastHttpUser POSTing the KServe v2 binary-tensor request built by tritonclient.http
                  (request_type "POST", name "http infer xN"); response parsed and checked the same way.
A request counts as failed unless it returns one `status: ok` report and one non-empty mask per photo.
Each user sends back-to-back (wait_time 0): `-u` is the number of concurrent clients (closed loop).

Options (command line, or the environment variable in brackets):
  --photos DIR      [PERF_PHOTOS]      photos folder (default: the repository's samples/)
  --photo-glob PAT  [PERF_PHOTO_GLOB]  file pattern in that folder (default *.jpg)
  --batch N         [PERF_BATCH]       photos per request (default 10; the ensemble takes at most 16)
  --grpc-url H:P    [PERF_GRPC_URL]    Triton gRPC endpoint (default 127.0.0.1:8001)
  --probability     [PERF_PROBABILITY] also ask for the PROBABILITY PNG (request parameter probability=true)
  --host URL        [LOCUST_HOST]      Triton HTTP endpoint for TritonHttpUser (default http://127.0.0.1:8000)
At the end it logs photos/s per request name (successful requests x batch / seconds since the start); the CSVs
hold requests/s.
"""

from __future__ import annotations

import logging
import random
import time

# Locust has monkey-patched the standard library with gevent by now. grpcio's own threads and polling do not
# cooperate with gevent unless told to: without this a blocking gRPC call stalls every other user in the process.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from locust import FastHttpUser, User, constant, events, task  # noqa: E402

from fundus_hemorrhage import client as service  # noqa: E402
from fundus_hemorrhage.client import ALL_OUTPUTS  # noqa: E402
from fundus_hemorrhage.contract import ENSEMBLE, LESIONS, MASK, MAX_BATCH_SIZE, PROBABILITY_PARAMETER  # noqa: E402
from fundus_hemorrhage_perf.common import DEFAULT_GLOB, PhotoCycle, check_outputs, load_photos  # noqa: E402

log = logging.getLogger("fundus_hemorrhage_perf.locustfile")
PHOTOS: list[tuple[str, bytes]] = []


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    group = parser.add_argument_group(f"{ENSEMBLE} load")
    group.add_argument("--photos", type=str, env_var="PERF_PHOTOS", default="",
                       help="folder of photos to send (default: the repository's samples/)")
    group.add_argument("--photo-glob", type=str, env_var="PERF_PHOTO_GLOB", default=DEFAULT_GLOB,
                       help="file pattern inside --photos")
    group.add_argument("--batch", type=int, env_var="PERF_BATCH", default=10, help="photos per request")
    group.add_argument("--grpc-url", type=str, env_var="PERF_GRPC_URL", default="127.0.0.1:8001",
                       help="Triton gRPC endpoint host:port")
    group.add_argument("--probability", action="store_true", env_var="PERF_PROBABILITY", default=False,
                       help="request the PROBABILITY PNG too")


@events.init.add_listener
def _load(environment, **_kwargs):
    options = environment.parsed_options
    if options is None:  # library use without a command line
        return
    PHOTOS[:] = load_photos(options.photos or None, options.photo_glob)
    if not 1 <= options.batch <= MAX_BATCH_SIZE:
        raise SystemExit(f"--batch must be within 1..{MAX_BATCH_SIZE} (the ensemble's max_batch_size)")
    log.info("%d photos, %d per request", len(PHOTOS), options.batch)


@events.test_stop.add_listener
def _photos_per_second(environment, **_kwargs):
    batch = environment.parsed_options.batch if environment.parsed_options else 1
    # From the start of the test (the total entry's start; per-name entries start at their first request) to now.
    elapsed = max(1e-9, time.time() - environment.stats.total.start_time)
    for (name, method), entry in sorted(environment.stats.entries.items()):
        ok = entry.num_requests - entry.num_failures
        rate = ok * batch / elapsed
        log.info("%s %s: %d ok, %d failed, %.2f photos/s, p50 %s ms, p95 %s ms", method, name, ok,
                 entry.num_failures, rate, entry.get_response_time_percentile(0.5),
                 entry.get_response_time_percentile(0.95))


class _Photos:
    """Per-user batch source; request payloads are built once per distinct batch and reused."""

    def _setup_photos(self):
        options = self.environment.parsed_options
        self.batch = options.batch
        self.parameters = {PROBABILITY_PARAMETER: True} if options.probability else None
        self.cycle = PhotoCycle(PHOTOS, self.batch, offset=random.randrange(len(PHOTOS)))
        self.payloads = {}

    def _next_payload(self, build):
        key = self.cycle.position
        batch = self.cycle.next()
        if key not in self.payloads:
            self.payloads[key] = build(batch)
        return self.payloads[key]


class TritonGrpcUser(_Photos, User):
    wait_time = constant(0)

    def on_start(self):
        self._setup_photos()
        self.client = grpcclient.InferenceServerClient(self.environment.parsed_options.grpc_url)
        self.outputs = [grpcclient.InferRequestedOutput(n) for n in ALL_OUTPUTS]

    def on_stop(self):
        # Close and drop the client while gevent's hub is alive: tritonclient's __del__ closes the channel again,
        # and a gRPC channel closed from the garbage collector at interpreter exit (hub gone) hangs the process.
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def _build(self, batch):
        return service.image_input("grpc", batch)

    @task
    def infer(self):
        image = self._next_payload(self._build)
        start = time.perf_counter()
        length, error = 0, None
        try:
            result = self.client.infer(ENSEMBLE, [image], outputs=self.outputs, parameters=self.parameters)
            length = check_outputs(result.as_numpy(LESIONS), result.as_numpy(MASK), self.batch)
        except Exception as exc:  # noqa: BLE001 -- every failure is a failed request
            error = exc
        self.environment.events.request.fire(
            request_type="grpc", name=f"infer x{self.batch}", response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=error, context={})


class TritonHttpUser(_Photos, FastHttpUser):
    wait_time = constant(0)
    host = "http://127.0.0.1:8000"
    network_timeout = 120.0
    connection_timeout = 30.0

    def on_start(self):
        self._setup_photos()
        self.path = f"/v2/models/{ENSEMBLE}/infer"

    def _build(self, batch):
        image = service.image_input("http", batch)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ALL_OUTPUTS]
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            [image], outputs=outputs, parameters=self.parameters)
        headers = {"Content-Type": "application/octet-stream"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        return body, headers

    @task
    def infer(self):
        body, headers = self._next_payload(self._build)
        with self.client.post(self.path, data=body, headers=headers, name=f"http infer x{self.batch}",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:300]}")
                return
            try:
                header_length = response.headers.get("Inference-Header-Content-Length")
                result = httpclient.InferenceServerClient.parse_response_body(
                    response.content, header_length=int(header_length) if header_length else None)
                check_outputs(result.as_numpy(LESIONS), result.as_numpy(MASK), self.batch)
            except Exception as exc:  # noqa: BLE001
                response.failure(exc)
