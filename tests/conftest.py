"""Shared fixtures. `triton_server` starts the real Triton (serve.py) once per session on free ports."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from perf.common import StartedServer, free_ports, start_triton  # noqa: F401  (free_ports: for the tests)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "samples"
SAMPLE_PHOTOS = sorted(SAMPLES.glob("IDRiD_*[0-9].jpg"))
ENSEMBLE = "hemorrhage_segmentation"


TritonServer = StartedServer


def start_server(tmp_dir: Path, model_repository: Path = REPO_ROOT / "model_repository", timeout: float = 240.0,
                 extra_args: tuple[str, ...] = (), admin_key: str = "test-admin-key") -> StartedServer:
    return start_triton(tmp_dir / f"triton-{time.monotonic_ns()}.log", model_repository, timeout, extra_args,
                        admin_key)


def stop_server(server: StartedServer, timeout: float = 90.0) -> int:
    return server.stop(timeout)


PROTOCOLS = {"http": httpclient, "grpc": grpcclient}


def make_client(server: StartedServer, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url, network_timeout=300.0, connection_timeout=300.0)
    return grpcclient.InferenceServerClient(server.grpc_url)


def infer(client, protocol: str, photos: list[bytes], probability: bool | None = None,
          outputs: tuple[str, ...] = ("MASK", "LESIONS", "PROBABILITY")):
    """One ensemble request with `photos` as IMAGE; `probability` sets the request parameter when not None."""
    module = PROTOCOLS[protocol]
    image = module.InferInput("IMAGE", [len(photos), 1], "BYTES")
    image.set_data_from_numpy(np.array(photos, dtype=np.object_).reshape(-1, 1))
    params = None if probability is None else {"probability": probability}
    return client.infer(ENSEMBLE, [image], outputs=[module.InferRequestedOutput(name) for name in outputs],
                        parameters=params)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> TritonServer:
    server = start_server(tmp_path_factory.mktemp("triton"))
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def sample_bytes() -> list[bytes]:
    return [p.read_bytes() for p in SAMPLE_PHOTOS]
