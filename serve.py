#!/usr/bin/env python3
"""Start NVIDIA Triton Inference Server on the model repository, in the foreground, and look after it.

    python serve.py [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
                    [--model-repository ./model_repository] [--poll-interval 5] [--watchdog-interval 2]
                    [--max-request-bytes N] [--grpc-tls-cert CERT --grpc-tls-key KEY [--grpc-tls-root-cert CA]]

Finds `tritonserver` on PATH (the NGC image) or inside the nvidia-pytriton wheel, prepares the Python
backend with the stub for the running Python, waits until the server is ready and prints its URLs.
SIGTERM or SIGINT: new requests are answered UNAVAILABLE (retry elsewhere), the ones in flight finish, every
model is unloaded, Triton stops, and this exits 0 (see serving/supervisor.py, drain()).

Model loading is explicit (all models at start-up). The model-repository (load/unload), shared-memory, trace
and logging APIs answer only requests that carry the header `admin-key: $HEMOSEG_ADMIN_KEY`; without that
variable a random key is generated and never shown, i.e. the APIs are closed to clients (serve.py itself uses it).

While Triton runs, a supervisor thread
  * restarts a model whose Python stub process died (watchdog, every --watchdog-interval s): Triton 2.51 itself
    keeps answering "Stub process ... is not healthy" for that instance until the model is reloaded;
  * picks up model updates (every --poll-interval s): a new or changed version folder or config.pbtxt is loaded
    through the repository API, after checking the new ONNX files with ONNX Runtime; a version that fails the
    check, or that Triton refuses, is not served and the version served before keeps serving.

Requests carry image bytes only (no file paths). --max-request-bytes bounds the image bytes of one request
(checked by the preprocess model; Triton 2.51 has no request-size option of its own). --grpc-tls-cert/-key
serve gRPC over TLS (--grpc-tls-root-cert: mutual TLS). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from fundus_hemorrhage.serving.supervisor import (ADMIN_HEADER, ENSEMBLE, Admin, Supervisor, default_max_request_bytes, drain, log,
                                python_stubs, ready_versions, reload_lost, remove_shm)

REPO_ROOT = Path(__file__).resolve().parent
# trace and logging settings take file paths: no client may set them.
RESTRICTED = "model-repository,shared-memory,trace,logging"
MAX_REQUEST_ENV = "HEMOSEG_MAX_REQUEST_BYTES"  # read by the preprocess model


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


def triton_options(binary: Path, env: dict) -> set[str]:
    """The command-line options this tritonserver knows (from --help)."""
    try:
        text = subprocess.run([str(binary), "--help"], env=env, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"^\s*(--[a-z0-9-]+)", text, re.MULTILINE))


def triton_command(args: argparse.Namespace, binary: Path, backends: Path | None, admin_key: str,
                   options: set[str] = frozenset()) -> list[str]:
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
    if "--http-max-input-size" in options:  # newer Triton only; 2.51 has no request-size option (docs/reliability.md)
        cmd.append(f"--http-max-input-size={args.max_request_bytes + 2**20}")
    if args.grpc_tls_cert:
        cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={args.grpc_tls_cert}",
                f"--grpc-server-key={args.grpc_tls_key}"]
        if args.grpc_tls_root_cert:  # clients must present a certificate signed by this CA
            cmd += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={args.grpc_tls_root_cert}"]
    if backends is not None:
        cmd.append(f"--backend-directory={backends}")
    return cmd


def server_env(extra_libs: list[str], max_request_bytes: int | None = None) -> dict:
    env = os.environ.copy()
    # The stub embeds libpython: use the one of the interpreter running us (and so our venv's packages).
    libs = [sysconfig.get_config_var("LIBDIR") or "", *extra_libs, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    if max_request_bytes:
        env[MAX_REQUEST_ENV] = str(max_request_bytes)
    return env



def wait_ready(url: str, grpc_address: tuple[str, int], process: subprocess.Popen, timeout: float) -> bool:
    """HTTP says ready and the gRPC port accepts connections (Triton exits if it cannot bind it, after HTTP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    socket.create_connection(grpc_address, timeout=2).close()
                    time.sleep(0.5)
                    return process.poll() is None
        except OSError:
            pass
        time.sleep(0.5)
    return False


def pin_version(admin: Admin, model: str, version: int) -> str | None:
    """Serve only `version` of `model` (instead of its config's version_policy); None, or why it failed."""
    before = ready_versions(admin.index())
    config = admin.config(model)
    config["version_policy"] = {"specific": {"versions": [version]}}
    status, message = admin.load(model, config)
    reload_lost(admin, before)  # e.g. the ensemble, if the reload took it down
    return None if status == 200 else f"HTTP {status}: {message[:300]}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    p.add_argument("--exit-timeout", type=int, default=60, help="seconds to let in-flight requests finish")
    p.add_argument("--poll-interval", type=float, default=5.0,
                   help="seconds between model-repository scans for updates; 0 disables (default 5)")
    p.add_argument("--watchdog-interval", type=float, default=2.0,
                   help="seconds between checks of the Python stub processes; 0 disables (default 2)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="most image bytes in one request (default: the ensemble's max_batch_size x the preprocess "
                        "max_bytes, 16 x 64 MiB)")
    p.add_argument("--grpc-tls-cert", type=Path, help="PEM server certificate: gRPC over TLS (with --grpc-tls-key)")
    p.add_argument("--grpc-tls-key", type=Path, help="PEM private key of --grpc-tls-cert")
    p.add_argument("--grpc-tls-root-cert", type=Path,
                   help="PEM CA certificate: mutual TLS, clients must present a certificate it signed")
    p.add_argument("--unet-version", type=int, default=None,
                   help="serve this version of the U-Net (default: the newest, as unet/config.pbtxt says)")
    p.add_argument("--log-verbose", type=int, default=0)
    args = p.parse_args(argv)
    if bool(args.grpc_tls_cert) != bool(args.grpc_tls_key):
        p.error("--grpc-tls-cert and --grpc-tls-key go together")
    if args.grpc_tls_root_cert and not args.grpc_tls_cert:
        p.error("--grpc-tls-root-cert needs --grpc-tls-cert and --grpc-tls-key")
    for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_root_cert"):
        path = getattr(args, name)
        if path is not None:
            if not os.access(path, os.R_OK):
                p.error(f"--{name.replace('_', '-')}: cannot read {path}")
            setattr(args, name, path.resolve())
    if args.max_request_bytes is not None and args.max_request_bytes <= 0:
        p.error("--max-request-bytes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model_repository = args.model_repository.resolve()
    if args.max_request_bytes is None:
        args.max_request_bytes = default_max_request_bytes(args.model_repository)
    binary, backends, extra_libs = find_tritonserver()
    admin_key = os.environ.get("HEMOSEG_ADMIN_KEY") or secrets.token_urlsafe(32)
    env = server_env(extra_libs, args.max_request_bytes)
    process = subprocess.Popen(triton_command(args, binary, backends, admin_key, triton_options(binary, env)),
                               env=env)

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.http_port}"
    admin = Admin(url, admin_key)
    stop_requested = threading.Event()
    admin_lock = threading.Lock()  # the supervisor's loads and the drain never overlap

    def on_signal(signum, _frame):
        if not stop_requested.is_set():
            print(f"serve.py: {signal.Signals(signum).name}: draining in-flight requests, then stopping", flush=True)
            stop_requested.set()

    def stopper():
        stop_requested.wait()
        if process.poll() is not None:
            return
        with admin_lock:
            drained = drain(admin, ENSEMBLE, args.exit_timeout)
        if not drained:
            process.send_signal(signal.SIGTERM)  # Triton's own stop: waits up to --exit-timeout
            return
        # Nothing is in flight and only the refusing model is loaded. Triton's graceful stop would answer
        # NOT_FOUND while it unloads that one too (and after a crashed stub or a refused load, Triton 2.51 waits
        # its whole --exit-timeout for an instance it never releases): stop it at once; new connections are
        # then refused (UNAVAILABLE). The stub exits with its parent; its shared memory is removed here.
        stubs = python_stubs(process.pid)
        process.kill()
        process.wait()
        for stub in stubs:
            remove_shm(stub.shm_region)
        log("all requests completed and every model unloaded; Triton stopped")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopper_thread = threading.Thread(target=stopper, daemon=True)
    stopper_thread.start()
    stopping = stop_requested.is_set

    ready = wait_ready(url, (host, args.grpc_port), process, args.ready_timeout)
    if ready and args.unet_version is not None:
        failure = pin_version(admin, "unet", args.unet_version)
        if failure:
            print(f"serve.py: cannot serve unet version {args.unet_version}: {failure}", file=sys.stderr, flush=True)
            ready = False
    if ready:
        print(f"Triton is ready: model 'hemorrhage_segmentation'\n"
              f"  HTTP    http://{host}:{args.http_port}\n"
              f"  gRPC    {host}:{args.grpc_port}{' (TLS)' if args.grpc_tls_cert else ''}\n"
              f"  metrics http://{host}:{args.metrics_port}/metrics", flush=True)
        if (args.watchdog_interval > 0 or args.poll_interval > 0) and not stopping():
            Supervisor(admin, args.model_repository, process.pid, args.watchdog_interval, args.poll_interval,
                       stop_requested, admin_lock).start()
    elif not stopping():
        print("serve.py: Triton did not become ready; see its log above", file=sys.stderr, flush=True)
        process.send_signal(signal.SIGTERM)
        process.wait()
        return 1
    code = process.wait()
    if stopping():
        stopper_thread.join(30)
        return 0
    print(f"serve.py: tritonserver exited with code {code}", file=sys.stderr, flush=True)
    return code or 1


if __name__ == "__main__":
    sys.exit(main())
