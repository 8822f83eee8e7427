"""Shared fixtures. `triton_server` starts the real Triton (serve.py) once per session on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "samples"
SAMPLE_PHOTOS = sorted(SAMPLES.glob("IDRiD_*[0-9].jpg"))
ENSEMBLE = "hemorrhage_segmentation"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class TritonServer:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    admin_key: str

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp_dir: Path, model_repository: Path = REPO_ROOT / "model_repository", timeout: float = 240.0,
                 extra_args: tuple[str, ...] = (), admin_key: str = "test-admin-key") -> TritonServer:
    http, grpc, metrics = free_ports(3)
    log_path = tmp_dir / f"triton-{http}.log"
    env = dict(os.environ, HEMOSEG_ADMIN_KEY=admin_key)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "serve.py"), "--http-port", str(http), "--grpc-port", str(grpc),
             "--metrics-port", str(metrics), "--model-repository", str(model_repository), *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    server = TritonServer(process, http, grpc, metrics, log_path, admin_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve.py exited with {process.returncode}:\n{server.log()[-5000:]}")
        try:
            with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"Triton not ready after {timeout} s:\n{server.log()[-5000:]}")


def stop_server(server: TritonServer, timeout: float = 90.0) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> TritonServer:
    server = start_server(tmp_path_factory.mktemp("triton"))
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def sample_bytes() -> list[bytes]:
    return [p.read_bytes() for p in SAMPLE_PHOTOS]
