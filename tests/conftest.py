"""Shared fixtures. `triton_server` starts the real Triton (serve.py) once per session on free ports."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fundus_hemorrhage import client as service
from fundus_hemorrhage.client import infer  # noqa: F401  (one ensemble request, for the tests)
from fundus_hemorrhage.contract import ENSEMBLE  # noqa: F401
from fundus_hemorrhage_ops.local_server import StartedServer, free_ports, start_triton  # noqa: F401  (free_ports: for the tests)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "samples"
SAMPLE_PHOTOS = sorted(SAMPLES.glob("IDRiD_*[0-9].jpg"))


TritonServer = StartedServer


def start_server(tmp_dir: Path, model_repository: Path = REPO_ROOT / "model_repository", timeout: float = 240.0,
                 extra_args: tuple[str, ...] = (), admin_key: str = "test-admin-key") -> StartedServer:
    return start_triton(tmp_dir / f"triton-{time.monotonic_ns()}.log", model_repository, timeout, extra_args,
                        admin_key)


def stop_server(server: StartedServer, timeout: float = 90.0) -> int:
    return server.stop(timeout)


def make_client(server: StartedServer, protocol: str):
    """A tritonclient client of `server` over "grpc" or "http"."""
    return service.make_client(server.http_url if protocol == "http" else server.grpc_url, protocol)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> TritonServer:
    server = start_server(tmp_path_factory.mktemp("triton"))
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def sample_bytes() -> list[bytes]:
    return [p.read_bytes() for p in SAMPLE_PHOTOS]
