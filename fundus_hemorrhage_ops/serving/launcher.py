"""Starts tritonserver on the model repository and looks after it until it stops (serve.py's main).

Finds `tritonserver` (on PATH, as in the NGC image, or inside the nvidia-pytriton wheel, whose Python backend
then gets the stub built for the running interpreter), builds its command line and environment, waits until it
is ready, optionally pins the unet version, then runs the supervisor and the drain.

tritonserver serves the run's live repository (live.py: --model-repository as committed, through links, plus the
live A/B split), never --model-repository itself, which serve.py does not write.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import logging
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
import urllib.request
from pathlib import Path

from google.protobuf.text_format import ParseError

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.model_config import parameters, preprocess_config, read_config
from fundus_hemorrhage.preprocessing import MAX_REQUEST_BYTES_ENV, max_request_bytes
from .admin import ADMIN_HEADER, Admin
from .drain import Drain, drain
from .proxy import BODY_HEADROOM, Admission, GrpcGuard, Proxy, find_haproxy, free_loopback_port
from .process import TritonProcess, become_subreaper, describe_exit, reap_orphans
from .leftovers import claim_python_envs, python_env_dirs, remove_dirs, remove_folders_of, sweep_stale_runs
from .live import SERVED_REPOSITORY, STATE_FILE, LiveRepository, LiveState, state_for_split
from .runs import Run, create_run, run_id, stale_run_dirs
from .supervisor import Supervisor
from .updates import repository_state
from .watchdog import python_stubs, remove_shm

log = logging.getLogger(__name__)

# trace and logging settings take file paths: no client may set them.
RESTRICTED = "model-repository,shared-memory,trace,logging"
ADMIN_KEY_ENV = "HEMOSEG_ADMIN_KEY"


def default_max_request_bytes(repository: Path) -> int:
    """Photos per request (the ensemble's max_batch_size) x the per-photo byte limit (preprocess max_bytes), from
    the repository's config.pbtxt files; the generated defaults where one cannot be read."""
    try:
        batch = read_config(repository / c.ENSEMBLE).max_batch_size or c.MAX_BATCH_SIZE
    except (OSError, ParseError):
        batch = c.MAX_BATCH_SIZE
    default_photo = parameters(preprocess_config())["max_bytes"]
    try:
        photo = parameters(read_config(repository / c.PREPROCESS)).get("max_bytes", default_photo)
    except (OSError, ParseError):
        photo = default_photo
    return max_request_bytes(batch, int(photo), environ={})


def find_tritonserver(work_dir: Path) -> tuple[Path, Path | None, list[str]]:
    """(tritonserver binary, backend directory or None for its default, extra library folders). Exits when there
    is none. The wheel's backends are prepared under `work_dir`."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None, []
    try:
        import pytriton
    except ImportError:
        sys.exit("serve.py: no tritonserver on PATH and the nvidia-pytriton wheel is not installed (make install)")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    backends = prepare_backends(dist, work_dir / "backends")
    return dist / "bin" / "tritonserver", backends, [str(dist.parent.parent / "nvidia_pytriton.libs")]


def prepare_backends(dist: Path, target: Path) -> Path:
    """Copy the wheel's Python backend to `target`/python with the stub built for this interpreter; `target`."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        sys.exit(f"serve.py: the nvidia-pytriton wheel has no Python backend stub for Python {version}")
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
                   options: set[str] = frozenset(), http: tuple[str, int] | None = None,
                   grpc: tuple[str, int] | None = None, repository: Path | None = None) -> list[str]:
    """tritonserver's command line for serve.py's arguments: explicit model control with every model loaded,
    the admin APIs behind `admin_key`, gRPC TLS when asked. `http`, `grpc`: (address, port) of Triton's HTTP or
    gRPC endpoint when it is not the public one (behind the port guard, proxy.py, which then also terminates the
    gRPC TLS). `repository`: the repository Triton serves (the run's live one; default --model-repository)."""
    restriction = f"{RESTRICTED}:{ADMIN_HEADER}={admin_key}"
    http_host, http_port = http or (args.host, args.http_port)
    grpc_host, grpc_port = grpc or (args.host, args.grpc_port)
    cmd = [
        str(binary),
        f"--model-repository={repository or args.model_repository}",
        f"--http-address={http_host}", f"--http-port={http_port}",
        f"--grpc-address={grpc_host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={args.host}", f"--metrics-port={args.metrics_port}",
        "--model-control-mode=explicit", "--load-model=*",
        f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}",
        f"--exit-timeout-secs={args.exit_timeout}",
        "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
        f"--log-verbose={args.log_verbose}",
    ]
    if "--http-max-input-size" in options:  # newer Triton only; 2.51 has no request-size option (docs/reliability.md)
        cmd.append(f"--http-max-input-size={args.max_request_bytes + 2**20}")
    if args.grpc_tls_cert and grpc is None:
        cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={args.grpc_tls_cert}",
                f"--grpc-server-key={args.grpc_tls_key}"]
        if args.grpc_tls_root_cert:  # clients must present a certificate signed by this CA
            cmd += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={args.grpc_tls_root_cert}"]
    if backends is not None:
        cmd.append(f"--backend-directory={backends}")
    return cmd


def server_env(extra_libs: list[str], max_request_bytes: int | None = None) -> dict:
    """tritonserver's environment: ours, with the library folders the stub needs and without PYTHONPATH (the
    models import the installed fundus_hemorrhage package, as under a bare `tritonserver`)."""
    env = os.environ.copy()
    env.pop("PYTHONPATH", None)
    # The stub embeds libpython: use the one of the interpreter running us (and so our venv's packages).
    libs = [sysconfig.get_config_var("LIBDIR") or "", *extra_libs, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    if max_request_bytes:
        env[MAX_REQUEST_BYTES_ENV] = str(max_request_bytes)
    return env


def wait_ready(url: str, grpc_address: tuple[str, int], process: TritonProcess, timeout: float,
               regions: set[str] | None = None) -> bool:
    """HTTP says ready and the gRPC port accepts connections (Triton exits if it cannot bind it, after HTTP).
    `regions`: collects the shared-memory regions of the stubs seen meanwhile (to remove if the start fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if regions is not None:
            regions.update(s.shm_region for s in python_stubs(process.pid))
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
    before = admin.ready_versions()
    config = admin.config(model)
    config["version_policy"] = {"specific": {"versions": [version]}}
    status, message = admin.load(model, config)
    admin.reload_lost(before)  # e.g. the ensemble, if the reload took it down
    return None if status == 200 else f"HTTP {status}: {message[:300]}"


RESTART_BACKOFF_S = (1, 2, 4, 8, 16, 30)  # between tritonserver restarts after crashes in a row
STABLE_S = 60.0  # a generation that served this long resets the backoff
RECYCLE_DRAIN_S = 20.0  # a recycle lets requests in flight finish this long (one stuck on a dead stub never does)


def serve(args: argparse.Namespace, work_dir: Path) -> int:
    """Run Triton (its HTTP and gRPC ports behind the port guard unless args.no_http_proxy / args.no_grpc_proxy)
    for serve.py's parsed arguments until it is stopped; the exit code (0 after a drain)."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="serve.py: %(message)s")
    args.model_repository = args.model_repository.resolve()
    if args.max_request_bytes is None:
        args.max_request_bytes = default_max_request_bytes(args.model_repository)
    binary, backends, extra_libs = find_tritonserver(work_dir)
    admin_key = os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(32)
    env = server_env(extra_libs, args.max_request_bytes)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    swept = sweep_stale_runs(stale_run_dirs(work_dir))  # what killed runs and crashed tritonservers left
    log.info("left by runs that are gone: %d Python-backend shared-memory region(s) removed (%.1f MB), %d "
             "repository-API folder(s) and %d python_env folder(s) under /tmp, %d run folder(s)",
             swept["shm_regions"], swept["shm_bytes"] / 1e6, swept["folders"], swept["python_env"], swept["runs"])
    this_run = create_run(work_dir, model_repository=str(args.model_repository),
                          http_url=f"http://{host}:{args.http_port}")
    live = LiveRepository(args.model_repository, this_run.dir / SERVED_REPOSITORY, this_run.dir / STATE_FILE)
    live.set_state(initial_state(args))
    live.sync()
    proxy, triton_http, triton_grpc = port_guard(args, this_run.dir)
    triton = TritonProcess(triton_command(args, binary, backends, admin_key, triton_options(binary, env),
                                          triton_http, triton_grpc, repository=live.root), env)
    url = f"http://127.0.0.1:{triton_http[1]}" if triton_http else f"http://{host}:{args.http_port}"
    admin = Admin(url, admin_key, marker=run_id())
    admin_lock = threading.Lock()  # the supervisor's loads, a recycle and the drain never overlap
    leftovers = GenerationLeftovers(this_run)
    become_subreaper()
    try:
        if proxy is not None:
            proxy.start()
        loaded = repository_state(live.root)
        leftovers.starting()
        triton.start()
        stop = Drain(admin, triton, c.ENSEMBLE, args.exit_timeout, admin_lock).install()
        return run(args, triton, admin, admin_lock, stop, host, proxy, loaded,
                   triton_grpc or (host, args.grpc_port), live, leftovers)
    except RuntimeError as exc:  # the proxy could not start
        print(f"serve.py: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if triton.popen is not None and triton.poll() is None:
            triton.kill()
            triton.wait()
        if proxy is not None:
            proxy.stop()
        leftovers.generation_over()
        this_run.remove()


class GenerationLeftovers:
    """The /tmp folders of this run's tritonserver generations (leftovers.py): the python_env folder each
    generation's Python backend makes (claimed when it is ready, removed when it has ended) and the folders of
    repository-API loads, which carry this run's marker (removed when a generation has ended)."""

    def __init__(self, run: Run):
        self.run, self.before, self.current = run, set(), []

    def starting(self) -> None:
        self.before = python_env_dirs()

    def started(self, triton_pid: int) -> None:
        claimed, unclaimed = claim_python_envs(self.before, triton_pid)
        self.current += claimed
        self.run.claim("python_env", [str(p) for p in claimed])
        if unclaimed:
            log.info("%d new python_env folder(s) under /tmp left alone: another tritonserver started at the same "
                     "time, so they may be its (%s)", len(unclaimed), ", ".join(map(str, unclaimed)))

    def generation_over(self) -> None:
        """After a tritonserver generation has ended (it is dead)."""
        envs = remove_dirs(self.current)
        folders = remove_folders_of({run_id()})
        if envs or folders:
            log.info("removed %d python_env and %d repository-API folder(s) of the ended tritonserver under /tmp",
                     envs, folders)
        self.current = []
        self.run.update(python_env=[])


def initial_state(args: argparse.Namespace) -> LiveState:
    """The live state a start serves: --traffic's split, else the committed configs."""
    split = getattr(args, "traffic", None)
    return state_for_split(split) if split is not None else LiveState()


def ready_unet_versions(admin: Admin) -> set[int]:
    """The unet versions Triton serves now (READY). Raises OSError when Triton does not answer."""
    return {int(v) for v in admin.ready_versions().get(c.SEGMENTATION_MODEL, ()) if v.isdigit()}


def port_guard(args: argparse.Namespace, work_dir: Path) -> tuple[Proxy | None, tuple[str, int] | None,
                                                                  tuple[str, int] | None]:
    """(the HAProxy guard or None, Triton's loopback HTTP address or None, Triton's loopback gRPC address or None)
    for serve.py's --no-http-proxy / --no-grpc-proxy. Exits when HAProxy is needed and not installed."""
    guard_http, guard_grpc = not getattr(args, "no_http_proxy", False), not getattr(args, "no_grpc_proxy", False)
    if not guard_grpc:
        log.warning("gRPC port %s is NOT guarded (--no-grpc-proxy): Triton inflates a compressed message "
                    "(grpc-encoding: gzip) without a bound; expose it only behind a gRPC proxy that refuses "
                    "compression (docs/reliability.md)", args.grpc_port)
    if not (guard_http or guard_grpc):
        return None, None, None
    haproxy = find_haproxy()
    if haproxy is None:
        sys.exit("serve.py: haproxy is not installed (make install, or apt-get install haproxy). It guards the "
                 "HTTP and gRPC ports against compressed-request bombs; --no-http-proxy / --no-grpc-proxy serve "
                 "Triton's ports directly (only behind a proxy of your own, docs/reliability.md)")
    triton_http = ("127.0.0.1", free_loopback_port()) if guard_http else None
    triton_grpc = ("127.0.0.1", free_loopback_port()) if guard_grpc else None
    grpc = None
    if guard_grpc:
        grpc = GrpcGuard(args.grpc_port, triton_grpc[1], args.grpc_tls_cert, args.grpc_tls_key,
                         args.grpc_tls_root_cert)
    proxy = Proxy(haproxy, work_dir, args.host, (args.http_port, triton_http[1]) if guard_http else None,
                  args.max_request_bytes + BODY_HEADROOM, grpc,
                  Admission.for_in_flight(getattr(args, "max_in_flight", Admission.in_flight)))
    return proxy, triton_http, triton_grpc


def run(args: argparse.Namespace, triton: TritonProcess, admin: Admin, admin_lock: threading.Lock, stop: Drain,
        host: str, proxy: Proxy | None, loaded: dict, triton_grpc: tuple[str, int], live: LiveRepository,
        leftovers: GenerationLeftovers) -> int:
    """Look after tritonserver generation by generation: wait until ready, supervise, and start it again (with
    backoff) when it dies, or recycle it when the watchdog says it holds a dead generation. `triton_grpc`: where
    Triton's own gRPC endpoint listens; `live`: the repository Triton serves; `leftovers`: its /tmp folders.
    Returns the exit code: 0 after a drain, 1 if the first start fails."""
    crashes = 0
    while True:
        started = time.monotonic()
        stubs: set[str] = set()
        ready = wait_ready(admin.url, triton_grpc, triton, args.ready_timeout, stubs)
        leftovers.started(triton.pid)
        if ready and args.unet_version is not None:
            failure = pin_version(admin, c.SEGMENTATION_MODEL, args.unet_version)
            if failure:
                print(f"serve.py: cannot serve {c.SEGMENTATION_MODEL} version {args.unet_version}: {failure}",
                      file=sys.stderr, flush=True)
                ready = False
        if triton.generation == 1 and not ready and not stop.stopping():
            print("serve.py: Triton did not become ready; see its log above", file=sys.stderr, flush=True)
            triton.send_signal(signal.SIGTERM)
            triton.wait()
            cleanup_generation(stubs)
            leftovers.generation_over()
            return 1
        recycle, generation_over = threading.Event(), threading.Event()
        stop.on_request.append(generation_over.set)
        supervisor = None
        if ready:
            if triton.generation == 1:
                print(f"Triton is ready: model '{c.ENSEMBLE}'\n"
                      f"  HTTP    http://{host}:{args.http_port}"
                      f"{' (behind the HTTP guard, haproxy)' if proxy and proxy.http else ''}\n"
                      f"  gRPC    {host}:{args.grpc_port}{' (TLS)' if args.grpc_tls_cert else ''}"
                      f"{' (behind the gRPC guard, haproxy)' if proxy and proxy.grpc else ' (NOT guarded)'}\n"
                      f"  metrics http://{host}:{args.metrics_port}/metrics", flush=True)
            else:
                log.info("tritonserver generation %d (pid %s) is ready, %.1f s after its start", triton.generation,
                         triton.pid, time.monotonic() - started)
            if (args.watchdog_interval > 0 or args.poll_interval > 0) and not stop.stopping():
                supervisor = Supervisor(admin, live.root, triton.pid, args.watchdog_interval,
                                        args.poll_interval, generation_over, admin_lock,
                                        on_leak=lambda reason: recycle.set(), loaded=loaded,
                                        sync=lambda: live.sync(lambda: ready_unet_versions(admin)))
                supervisor.start()
        stubs |= {s.shm_region for s in python_stubs(triton.pid)}
        while triton.poll() is None and ready and not recycle.is_set():
            time.sleep(0.2)
            if proxy is not None and not proxy.alive() and not stop.stopping():
                log.info("haproxy exited (code %s); starting it again", proxy.process.returncode)
                proxy.start()
        if stop.stopping():
            triton.wait()
            stop.join(30)
            return 0
        generation_over.set()
        if supervisor is not None:
            supervisor.join(60)
            stubs |= supervisor.shm_regions()
        if triton.poll() is None:  # a recycle, or a generation that never became ready
            why = "a recycle: it holds a dead generation" if recycle.is_set() else "it did not become ready"
            log.info("stopping tritonserver generation %d for %s", triton.generation, why)
            with admin_lock:
                if recycle.is_set() and not stop.stopping():
                    drain(admin, c.ENSEMBLE, RECYCLE_DRAIN_S)  # UNAVAILABLE for new requests, in-flight ones finish
                stubs |= {s.shm_region for s in python_stubs(triton.pid)}
                triton.kill()
                triton.wait()
            crashes = 0 if recycle.is_set() else crashes + 1
        else:
            crashes = crashes + 1 if time.monotonic() - started < STABLE_S else 1
            log.info("tritonserver generation %d ended unexpectedly (%s); readiness is down until it is back",
                     triton.generation, describe_exit(triton.poll()))
        delay = RESTART_BACKOFF_S[min(crashes, len(RESTART_BACKOFF_S)) - 1] if crashes else 0
        if stop.requested.wait(delay):
            return 0
        cleanup_generation(stubs)
        leftovers.generation_over()
        log.info("starting tritonserver again%s", f" (after {delay} s; crash {crashes} in a row)" if crashes else "")
        loaded = repository_state(live.root)
        leftovers.starting()
        triton.start()


def cleanup_generation(regions: set[str], settle: float = 5.0) -> None:
    """After a tritonserver generation ended: reap its stubs (re-parented to serve.py, they exit when they see
    their parent gone) and remove their shared-memory regions, which Triton leaves after a kill."""
    deadline = time.monotonic() + settle
    regions = set(regions)
    while True:
        reaped = reap_orphans()
        orphans = [s for s in python_stubs(os.getpid())]
        regions |= {s.shm_region for s in orphans}  # a stub of that generation, alive: its region is that one's
        if not orphans or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for orphan in orphans:  # still running after `settle`: its parent is gone, it serves nothing
        with contextlib.suppress(OSError):
            os.kill(orphan.pid, signal.SIGKILL)
    time.sleep(0.1)
    reaped += reap_orphans()
    for region in regions:
        remove_shm(region)
    log.info("previous generation cleaned up: %d stub(s) reaped, %d shared-memory region(s) removed", len(reaped),
             len(regions))
