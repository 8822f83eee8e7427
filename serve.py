#!/usr/bin/env python3
"""Start NVIDIA Triton Inference Server on the model repository, in the foreground.

    python serve.py [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
                    [--model-repository ./model_repository]

Finds `tritonserver` on PATH (the NGC image) or inside the nvidia-pytriton wheel, prepares the Python
backend with the stub for the running Python, waits until the server is ready and prints its URLs.
SIGTERM or SIGINT: Triton stops accepting requests, finishes the ones in flight, and this exits 0.

Model loading is explicit (all models at start-up). The model-repository (load/unload) and shared-memory
APIs answer only requests that carry the header `admin-key: $HEMOSEG_ADMIN_KEY`; without that variable a
random key is generated and never shown, i.e. the APIs are closed.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
ADMIN_HEADER = "admin-key"
RESTRICTED = "model-repository,shared-memory"
ENSEMBLE = "hemorrhage_segmentation"


def find_tritonserver() -> tuple[Path, Path | None, list[str]]:
    """(tritonserver binary, backend directory or None for its default, extra library folders)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None, []
    try:
        import pytriton
    except ImportError:
        sys.exit("serve.py: no tritonserver on PATH and the nvidia-pytriton wheel is not installed (make install)")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    return dist / "bin" / "tritonserver", prepare_backends(dist), [str(dist.parent.parent / "nvidia_pytriton.libs")]


def prepare_backends(dist: Path) -> Path:
    """Copy the wheel's backends to .triton/ with the Python backend stub built for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        sys.exit(f"serve.py: the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    target = REPO_ROOT / ".triton" / "backends"
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    files = {item.name: item for item in (dist / "backends" / "python").iterdir() if item.is_file()}
    files["triton_python_backend_stub"] = stub
    for name, source in files.items():
        dest = python_dir / name
        if not dest.exists() or not filecmp.cmp(source, dest, shallow=False):
            # Copy beside, then rename: a server already running from this folder keeps its open files.
            tmp = dest.with_name(f".{name}.{os.getpid()}")
            shutil.copy2(source, tmp)
            os.replace(tmp, dest)
    return target


def triton_command(args: argparse.Namespace, binary: Path, backends: Path | None, admin_key: str) -> list[str]:
    restriction = f"{RESTRICTED}:{ADMIN_HEADER}={admin_key}"
    cmd = [
        str(binary),
        f"--model-repository={args.model_repository}",
        f"--http-address={args.host}", f"--http-port={args.http_port}",
        f"--grpc-address={args.host}", f"--grpc-port={args.grpc_port}",
        f"--metrics-address={args.host}", f"--metrics-port={args.metrics_port}",
        "--model-control-mode=explicit", "--load-model=*",
        f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}",
        f"--exit-timeout-secs={args.exit_timeout}",
        "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
        f"--log-verbose={args.log_verbose}",
    ]
    if backends is not None:
        cmd.append(f"--backend-directory={backends}")
    return cmd


def server_env(extra_libs: list[str]) -> dict:
    env = os.environ.copy()
    # The stub embeds libpython: use the one of the interpreter running us (and so our venv's packages).
    libs = [sysconfig.get_config_var("LIBDIR") or "", *extra_libs, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PYTHONPATH"] = ":".join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def drain(url: str, admin_key: str, model: str, timeout: float) -> None:
    """Stop new requests to the ensemble and wait for those in flight, before Triton itself stops.

    Triton's own SIGTERM handling stops every model's scheduler at once, which fails ensemble requests
    between two steps ("scheduler for model has stopped accepting new inference requests"). Unloading the
    ensemble first refuses new requests while its composing models stay up until the in-flight ones finish.
    """
    def call(path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"{url}{path}", data=body, headers={ADMIN_HEADER: admin_key})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.read()

    deadline = time.monotonic() + timeout
    try:
        call(f"/v2/repository/models/{model}/unload", b"{}")
        while time.monotonic() < deadline:
            states = json.loads(call("/v2/repository/index", b"{}"))
            # UNLOADING while requests are in flight; UNAVAILABLE once the last one has completed.
            if all(m.get("state") == "UNAVAILABLE" for m in states if m.get("name") == model):
                return
            time.sleep(0.2)
    except OSError as exc:
        print(f"serve.py: drain through the repository API failed ({exc}); stopping Triton directly", flush=True)


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    p.add_argument("--exit-timeout", type=int, default=60, help="seconds to let in-flight requests finish")
    p.add_argument("--log-verbose", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model_repository = args.model_repository.resolve()
    binary, backends, extra_libs = find_tritonserver()
    admin_key = os.environ.get("HEMOSEG_ADMIN_KEY") or secrets.token_urlsafe(32)
    process = subprocess.Popen(triton_command(args, binary, backends, admin_key), env=server_env(extra_libs))

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.http_port}"
    stop_requested = threading.Event()

    def on_signal(signum, _frame):
        if not stop_requested.is_set():
            print(f"serve.py: {signal.Signals(signum).name}: draining in-flight requests, then stopping", flush=True)
            stop_requested.set()

    def stopper():
        stop_requested.wait()
        if process.poll() is None:
            drain(url, admin_key, ENSEMBLE, args.exit_timeout)
            process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=stopper, daemon=True).start()
    stopping = stop_requested.is_set

    if wait_ready(url, process, args.ready_timeout):
        print(f"Triton is ready: model 'hemorrhage_segmentation'\n"
              f"  HTTP    http://{host}:{args.http_port}\n"
              f"  gRPC    {host}:{args.grpc_port}\n"
              f"  metrics http://{host}:{args.metrics_port}/metrics", flush=True)
    elif not stopping():
        print("serve.py: Triton did not become ready; see its log above", file=sys.stderr, flush=True)
        process.send_signal(signal.SIGTERM)
        process.wait()
        return 1
    code = process.wait()
    if stopping():
        return 0
    print(f"serve.py: tritonserver exited with code {code}", file=sys.stderr, flush=True)
    return code or 1


if __name__ == "__main__":
    sys.exit(main())
