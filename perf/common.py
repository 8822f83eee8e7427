"""Shared helpers for the perf tools: photos, request building, response checks, the served version, Triton
start/stop, machine facts."""

from __future__ import annotations

import contextlib
import json
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

import numpy as np

from fundus_hemorrhage.contract import ENSEMBLE, SEGMENTATION_MODEL  # noqa: F401  (ENSEMBLE: for the perf tools)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
CHECKPOINTS = REPO_ROOT / "checkpoints"
SAMPLE_PHOTOS = REPO_ROOT / "samples"  # three full-size IDRiD photos; --photos for a larger set
DEFAULT_GLOB = "*.jpg"


def relative(path: str | Path | None) -> str | None:
    """`path` as results record it: relative to the repository (e.g. "../shared/data/..." beside it), or
    "<tmp>/..." inside the system's temporary folder, so that no machine's absolute path gets committed."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    tmp = Path(tempfile.gettempdir()).resolve()
    if resolved.is_relative_to(tmp) and not resolved.is_relative_to(REPO_ROOT):  # the checkout may be in /tmp
        return (Path("<tmp>") / resolved.relative_to(tmp)).as_posix()
    return Path(os.path.relpath(resolved, REPO_ROOT)).as_posix()


def load_photos(folder: str | Path | None = None, pattern: str = DEFAULT_GLOB) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every photo in `folder` (default: the repository's samples/) matching `pattern`,
    sorted by name."""
    folder = Path(folder) if folder else SAMPLE_PHOTOS
    paths = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not paths:
        raise SystemExit(f"no photos matching {pattern!r} in {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


class PhotoCycle:
    """Hands out batches of photos round-robin, each user/client starting at its own offset."""

    def __init__(self, photos: list[tuple[str, bytes]], batch: int, offset: int = 0):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.photos, self.batch, self.position = photos, batch, offset % len(photos)

    def next(self) -> list[bytes]:
        out = [self.photos[(self.position + i) % len(self.photos)][1] for i in range(self.batch)]
        self.position = (self.position + self.batch) % len(self.photos)
        return out


def image_tensor(batch: list[bytes]) -> np.ndarray:
    """The ensemble's IMAGE input: BYTES [N, 1]."""
    arr = np.empty((len(batch), 1), dtype=np.object_)
    for i, data in enumerate(batch):
        arr[i, 0] = data
    return arr


def check_outputs(lesions: np.ndarray | None, masks: np.ndarray | None, expected: int) -> int:
    """Raise if the response does not hold one ok report and one mask per photo; returns the response bytes."""
    if lesions is None or masks is None:
        raise RuntimeError("response lacks LESIONS or MASK")
    lesions, masks = lesions.reshape(-1), masks.reshape(-1)
    if lesions.shape[0] != expected or masks.shape[0] != expected:
        raise RuntimeError(f"expected {expected} results, got {lesions.shape[0]} reports and {masks.shape[0]} masks")
    for i, raw in enumerate(lesions):
        report = json.loads(raw)
        if report.get("status") != "ok":
            raise RuntimeError(f"photo {i}: {report.get('error', report.get('status'))}")
        if not masks[i]:
            raise RuntimeError(f"photo {i}: empty mask")
    return int(sum(len(x) for x in lesions) + sum(len(x) for x in masks))


def served_version(model_repository: Path = MODEL_REPOSITORY,
                   model: str = SEGMENTATION_MODEL) -> tuple[Path, dict]:
    """The newest version folder of `model` holding a model.onnx, and its model.json (threshold, checkpoint)."""
    versions = sorted((int(d.name) for d in (model_repository / model).iterdir() if d.name.isdigit()), reverse=True)
    for v in versions:
        folder = model_repository / model / str(v)
        if (folder / "model.onnx").exists():
            meta_path = folder / "model.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            return folder, meta
    raise SystemExit(f"no {model}/<version>/model.onnx under {model_repository}")


def served_checkpoint(meta: dict, checkpoints: Path = CHECKPOINTS) -> Path:
    """The training checkpoint a version was built from: its model.json's "checkpoint", under checkpoints/."""
    name = meta.get("checkpoint")
    if not name:
        raise SystemExit("the served version's model.json names no checkpoint: pass --checkpoint")
    return checkpoints / name


# ------------------------------------------------------------------------------------------- Triton server

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


def machine_info() -> dict:
    info = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}
    try:
        info["loadavg_1m_5m_15m"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import psutil
        info["cpu_count_physical"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info
