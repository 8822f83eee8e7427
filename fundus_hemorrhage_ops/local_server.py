"""serve.py on this machine for the tests and the benchmarks: free loopback ports, start until ready, stop (drain),
or the tritonserver already serving a URL here."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


READY_LINE = "Triton is ready"  # what serve.py prints once every model is loaded (and pinned, if asked)


@dataclass
class StartedServer:
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

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM (serve.py drains), SIGKILL to the whole group if it hangs; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def start_triton(log_path: Path, model_repository: Path = MODEL_REPOSITORY, timeout: float = 300.0,
                 extra_args: tuple[str, ...] = (), admin_key: str | None = None) -> StartedServer:
    """serve.py on free loopback ports; returns once serve.py says the service is ready."""
    http, grpc, metrics = free_ports(3)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **({"HEMOSEG_ADMIN_KEY": admin_key} if admin_key else {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "serve.py"), "--http-port", str(http), "--grpc-port", str(grpc),
             "--metrics-port", str(metrics), "--model-repository", str(model_repository), *extra_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, start_new_session=True)
    server = StartedServer(process, http, grpc, metrics, log_path, admin_key or "")
    deadline = time.monotonic() + timeout
    while READY_LINE not in server.log():
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"serve.py did not become ready (exit code {process.returncode}, log {log_path}):\n"
                               f"{server.log()[-5000:]}")
        time.sleep(0.3)
    return server


@contextlib.contextmanager
def local_triton(url: str | None, name: str):
    """(gRPC URL, tritonserver pid) of the server at `url` on this machine, or of a serve.py started for the
    duration of the block (its log: a new temporary folder NAME-*/, kept for a post-mortem)."""
    import psutil

    server = None
    if not url:
        print("starting serve.py ...", flush=True)
        server = start_triton(Path(tempfile.mkdtemp(prefix=f"{name}-")) / "triton.log")
        print(f"serve.py log: {server.log_path}", flush=True)
        url = server.grpc_url
    try:
        port = url.rsplit(":", 1)[1]
        pid = next((p.pid for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "tritonserver"
                    and f"--grpc-port={port}" in (p.info["cmdline"] or [])), None)
        if pid is None:  # behind serve.py's gRPC guard: the tritonserver child of the serve.py on that port
            serve = (p for p in psutil.process_iter(["cmdline"]) if "serve.py" in " ".join(p.info["cmdline"] or [])
                     and f"--grpc-port {port} " in " ".join(p.info["cmdline"] or []) + " ")
            pid = next((c.pid for p in serve for c in p.children() if c.name() == "tritonserver"), None)
        if pid is None:
            raise SystemExit(f"no tritonserver process with --grpc-port={port} on this machine")
        yield url, pid
    finally:
        if server is not None:
            server.stop()


def wait_http_ready(url: str, timeout: float, process: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


