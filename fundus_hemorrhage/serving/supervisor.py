"""What serve.py does while Triton runs: the supervisor (stub watchdog, model updates) and the drain on stop.

Everything here talks to Triton through its HTTP API with the admin key (class Admin), and looks at its
Python backend stubs through /proc. serve.py starts Triton, then these.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ADMIN_HEADER = "admin-key"
ENSEMBLE = "hemorrhage_segmentation"
DEFAULT_MAX_BATCH, DEFAULT_PHOTO_BYTES = 16, 64 * 2**20
LOAD_TIMEOUT = 300.0


def log(message: str) -> None:
    print(f"serve.py: {message}", flush=True)


# ------------------------------------------------------------------------------------------ model repository

def config_text(model_dir: Path) -> str:
    """config.pbtxt without comments ('' when unreadable)."""
    try:
        return re.sub(r"#[^\n]*", "", (model_dir / "config.pbtxt").read_text())
    except OSError:
        return ""


def default_max_request_bytes(repository: Path) -> int:
    """Photos per request (the ensemble's max_batch_size) x the per-photo byte limit (preprocess max_bytes)."""
    batch = re.search(r"max_batch_size\s*:\s*(\d+)", config_text(repository / ENSEMBLE))
    photo = re.search(r'key:\s*"max_bytes"\s*,?\s*value:\s*\{\s*string_value:\s*"(\d+)"',
                      config_text(repository / "preprocess"))
    return (int(batch.group(1)) if batch else DEFAULT_MAX_BATCH) * (int(photo.group(1)) if photo else DEFAULT_PHOTO_BYTES)


def version_policy(text: str) -> tuple[str, object]:
    """('latest', n) | ('all', None) | ('specific', [versions]) from config.pbtxt text; Triton's default latest 1."""
    m = re.search(r"version_policy\s*:?\s*\{\s*(latest|all|specific)\s*:?\s*\{([^}]*)\}", text)
    if not m:
        return "latest", 1
    kind, body = m.group(1), m.group(2)
    if kind == "latest":
        n = re.search(r"num_versions\s*:\s*(\d+)", body)
        return "latest", int(n.group(1)) if n else 1
    if kind == "specific":
        return "specific", [int(v) for v in re.findall(r"\d+", body)]
    return "all", None


def select_versions(policy: tuple[str, object], versions: list[int]) -> list[int]:
    kind, value = policy
    ordered = sorted(versions)
    if kind == "latest":
        return ordered[-int(value):] if value else []
    if kind == "specific":
        return [v for v in ordered if v in value]
    return ordered


@dataclass(frozen=True)
class Fingerprint:
    config: tuple
    versions: dict = field(hash=False)


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return ()


def fingerprint(model_dir: Path) -> Fingerprint:
    """What a reload depends on: config.pbtxt and every file of every version folder (size, mtime)."""
    versions = {}
    for entry in sorted(model_dir.iterdir()) if model_dir.is_dir() else []:
        if entry.is_dir() and entry.name.isdigit():
            files = []
            for root, dirs, names in os.walk(entry):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(names):
                    path = Path(root) / name
                    files.append((str(path.relative_to(entry)), *_stat(path)))
            versions[int(entry.name)] = tuple(files)
    return Fingerprint(_stat(model_dir / "config.pbtxt"), versions)


_NUMPY_TYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_FP64": "float64", "TYPE_INT64": "int64",
                "TYPE_INT32": "int32", "TYPE_UINT8": "uint8", "TYPE_INT8": "int8", "TYPE_BOOL": "bool"}

_VALIDATE_ONNX = r"""
import json, sys
import numpy as np
import onnxruntime as ort
path, spec = sys.argv[1], json.loads(sys.argv[2])
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
if spec:
    x = np.zeros(spec["input_shape"], dtype=spec["input_dtype"])
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    if list(out.shape) != spec["output_shape"]:
        sys.exit(f"output shape {list(out.shape)} for input {spec['input_shape']}, the model config expects "
                 f"{spec['output_shape']}")
    if not np.all(np.isfinite(out)):
        sys.exit("non-finite output for a zero input")
"""


def validate_version(version_dir: Path, config: dict | None) -> str | None:
    """None if every ONNX file of the folder loads in ONNX Runtime (and, given the served model config, maps a
    zero input of the configured shape to an output of the configured shape); else the reason."""
    spec = None
    if config and config.get("input") and config.get("output"):
        batch = [1] if config.get("max_batch_size", 0) > 0 else []
        dtype = _NUMPY_TYPES.get(config["input"][0].get("data_type", ""))
        if dtype:
            spec = {"input_shape": batch + [int(d) for d in config["input"][0]["dims"]], "input_dtype": dtype,
                    "output_shape": batch + [int(d) for d in config["output"][0]["dims"]]}
    for onnx in sorted(version_dir.glob("*.onnx")):
        try:
            done = subprocess.run([sys.executable, "-c", _VALIDATE_ONNX, str(onnx), json.dumps(spec)],
                                  capture_output=True, text=True, timeout=LOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"{onnx.name}: ONNX Runtime did not load it within {LOAD_TIMEOUT:.0f} s"
        if done.returncode != 0:
            if "No module named 'onnxruntime'" in done.stderr:
                return None  # nothing to check with: Triton's own load decides
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return f"{onnx.name}: {lines[-1][:300] if lines else f'exit code {done.returncode}'}"
    return None


@dataclass(frozen=True)
class Stub:
    pid: int
    model_py: Path
    shm_region: str


def python_stubs(parent_pid: int) -> list[Stub]:
    """Live Python backend stub processes among the children of tritonserver.

    A stub's command line is `triton_python_backend_stub <repository>/<model>/<version>/model.py <shm region> ...`.
    """
    stubs = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) != parent_pid or state in ("Z", "X"):
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
            stubs.append(Stub(int(entry), Path(os.fsdecode(argv[1])), os.fsdecode(argv[2])))
    return stubs


def stub_counts(stubs: list[Stub], repository: Path) -> dict[tuple[str, str], int]:
    """Stubs of the models of this repository, counted by (model, version)."""
    counts: dict[tuple[str, str], int] = {}
    for stub in stubs:
        if stub.model_py.parent.parent.parent == repository:
            key = (stub.model_py.parent.parent.name, stub.model_py.parent.name)
            counts[key] = counts.get(key, 0) + 1
    return counts


def remove_shm(region: str) -> None:
    if region.startswith("triton_python_backend_shm_region_"):
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{region}")


# -------------------------------------------------------------------------------------------- Triton admin

class Admin:
    """Triton's HTTP API, with the admin key for the restricted endpoints."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key

    def call(self, path: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers={ADMIN_HEADER: self.key})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str, body: bytes | None = None) -> object:
        status, data = self.call(path, body)
        if status != 200:
            raise OSError(f"{path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data or b"null")

    def index(self) -> list[dict]:
        return self.json("/v2/repository/index", b"{}")

    def config(self, model: str, version: str | None = None) -> dict:
        return self.json(f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/config")

    def load(self, model: str, config: dict | None = None, files: dict[str, bytes] | None = None) -> tuple[int, str]:
        parameters = {"config": json.dumps(config)} if config else {}
        parameters.update({f"file:{path}": base64.b64encode(data).decode() for path, data in (files or {}).items()})
        body = {"parameters": parameters} if parameters else {}
        status, data = self.call(f"/v2/repository/models/{model}/load", json.dumps(body).encode(), LOAD_TIMEOUT)
        try:
            message = json.loads(data).get("error", "") if data else ""
        except ValueError:
            message = data.decode(errors="replace")
        return status, message

    def unload(self, model: str) -> None:
        self.call(f"/v2/repository/models/{model}/unload", b"{}")


def ready_versions(index: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for entry in index:
        if entry.get("state") == "READY":
            out.setdefault(entry["name"], set()).add(str(entry.get("version", "")))
    return out


def reload_lost(admin: Admin, before: dict[str, set[str]]) -> None:
    """Load again any model that was READY before a reload and is not now (e.g. the ensemble)."""
    now = ready_versions(admin.index())
    for model in sorted(set(before) - set(now)):
        status, message = admin.load(model)
        log(f"model '{model}' was no longer ready after a reload; loading it: HTTP {status} {message[:300]}")


def instance_count(config: dict) -> int | None:
    """Stub processes a loaded Python-backend model version runs; None for other backends (no stubs)."""
    if config.get("backend") != "python":
        return None
    groups = config.get("instance_group") or [{}]
    return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus") or [])) for g in groups)


class Supervisor(threading.Thread):
    """Restarts models whose stub died; loads model updates, keeping the served version if the new one is bad."""

    def __init__(self, admin: Admin, repository: Path, triton_pid: int, watchdog_interval: float,
                 poll_interval: float, stopping: threading.Event, lock: threading.Lock):
        super().__init__(name="supervisor", daemon=True)
        self.admin, self.repository, self.triton_pid = admin, repository, triton_pid
        self.watchdog_interval, self.poll_interval = watchdog_interval, poll_interval
        self.stopping, self.lock = stopping, lock
        self.loaded: dict[str, Fingerprint] = {}  # what Triton was last asked to serve, per model
        self.pending: dict[str, Fingerprint] = {}  # a change seen once, waiting to settle
        self.refused: dict[tuple[str, int], tuple[tuple, str]] = {}  # (model, version) -> (its files, reason)
        self.instances: dict[tuple[str, str], int | None] = {}
        self.suspect: set[tuple[str, str]] = set()
        self.restarts: list[dict] = []
        self.known_stubs: dict[int, Stub] = {}  # every stub seen alive, by pid

    def models(self) -> list[str]:
        return sorted(d.name for d in self.repository.iterdir() if (d / "config.pbtxt").is_file())

    def run(self) -> None:
        self.loaded = {m: fingerprint(self.repository / m) for m in self.models()}
        self.known_stubs = {stub.pid: stub for stub in python_stubs(self.triton_pid)}
        now = time.monotonic()
        next_watch, next_poll = now + self.watchdog_interval, now + self.poll_interval
        while not self.stopping.wait(0.25):
            now = time.monotonic()
            for due, interval, action in ((next_watch, self.watchdog_interval, self.check_stubs),
                                          (next_poll, self.poll_interval, self.poll_repository)):
                if interval > 0 and now >= due and not self.stopping.is_set():
                    try:
                        with self.lock:
                            if not self.stopping.is_set():
                                action()
                    except Exception as exc:  # the supervisor must outlive any single failure
                        log(f"supervisor: {action.__name__} failed: {exc!r}")
            if self.watchdog_interval > 0 and now >= next_watch:
                next_watch = time.monotonic() + self.watchdog_interval
            if self.poll_interval > 0 and now >= next_poll:
                next_poll = time.monotonic() + self.poll_interval

    # -------------------------------------------------------------------------------------- watchdog

    def expected_instances(self, model: str, version: str, fresh: bool = False) -> int | None:
        key = (model, version)
        if fresh or key not in self.instances:
            self.instances[key] = instance_count(self.admin.config(model, version))
        return self.instances[key]

    def check_stubs(self) -> None:
        ready = ready_versions(self.admin.index())
        live = python_stubs(self.triton_pid)
        stubs = stub_counts(live, self.repository)
        self.known_stubs.update({stub.pid: stub for stub in live})
        short = set()
        for model, versions in ready.items():
            for version in versions:
                expected = self.expected_instances(model, version)
                if expected and stubs.get((model, version), 0) < expected:
                    short.add((model, version))
        # Act on a shortfall seen twice in a row (a load that was just starting is not a crash), re-checked
        # against the served config (an admin may have changed the instance count).
        confirmed = {key for key in short & self.suspect
                     if stubs.get(key, 0) < (self.expected_instances(*key, fresh=True) or 0)}
        self.suspect = short - confirmed
        for model in sorted({m for m, _ in confirmed}):
            versions = sorted(v for m, v in confirmed if m == model)
            have = {v: stubs.get((model, v), 0) for v in versions}
            log(f"watchdog: model '{model}' version(s) {', '.join(versions)} runs {have} stub process(es), "
                f"expected {[self.instances.get((model, v)) for v in versions]}: restarting it")
            self.restart(model, ready)

    def restart(self, model: str, ready: dict[str, set[str]]) -> None:
        """Reload exactly the versions that were being served, with the served config.

        Triton keeps the instances of a model whose config did not change (the dead one included): a marker
        parameter makes the config differ, so that every instance is created anew.
        """
        start = time.monotonic()
        config = self.admin.config(model)
        config["version_policy"] = {"specific": {"versions": sorted(int(v) for v in ready.get(model, ()))}}
        config.setdefault("parameters", {})["serve_py_restart"] = {"string_value": str(time.time_ns())}
        status, message = self.admin.load(model, config)
        self.instances.clear()
        reload_lost(self.admin, ready)
        self.forget_dead_stubs(model)
        elapsed = time.monotonic() - start
        self.restarts.append({"model": model, "status": status, "seconds": round(elapsed, 2)})
        if status == 200:
            log(f"watchdog: model '{model}' restarted in {elapsed:.1f} s")
        else:
            log(f"watchdog: restarting model '{model}' failed (HTTP {status}): {message[:500]}")

    def forget_dead_stubs(self, model: str) -> None:
        """After a restart: remove the shared memory that the model's killed stubs left behind (Triton 2.51
        does not), so that repeated crashes do not fill /dev/shm."""
        alive = {stub.pid for stub in python_stubs(self.triton_pid)}
        for pid, stub in list(self.known_stubs.items()):
            if pid in alive:
                continue
            if stub.model_py.parent.parent.name == model:
                remove_shm(stub.shm_region)
                del self.known_stubs[pid]
            elif not os.path.exists(f"/dev/shm/{stub.shm_region}"):  # ended normally: Triton removed it
                del self.known_stubs[pid]

    # ------------------------------------------------------------------------------------- updates

    def poll_repository(self) -> None:
        for model in self.models():
            fp = fingerprint(self.repository / model)
            if fp == self.loaded.get(model):
                self.pending.pop(model, None)
                continue
            if fp != self.pending.get(model):  # changed since the last poll: let the copy finish first
                self.pending[model] = fp
                continue
            del self.pending[model]
            self.update(model, fp)

    def update(self, model: str, fp: Fingerprint) -> None:
        previous = self.loaded.get(model)
        index = self.admin.index()
        before = ready_versions(index)
        try:
            served_config = self.admin.config(model) if model in before else None
        except OSError:
            served_config = None
        bad: dict[int, str] = {}
        for version, files in sorted(fp.versions.items()):
            refused = self.refused.get((model, version))
            if refused and refused[0] == files:
                bad[version] = refused[1]
            elif previous is None or previous.versions.get(version) != files:
                reason = validate_version(self.repository / model / str(version), served_config)
                if reason:
                    bad[version] = reason
                    self.refused[(model, version)] = (files, reason)
                    log(f"update: model '{model}' version {version} refused: {reason}")
        policy = version_policy(config_text(self.repository / model))
        wanted = select_versions(policy, list(fp.versions))
        serving = sorted(before.get(model, ()))
        if not wanted:
            log(f"update: model '{model}' has no version folder to load; still serving version(s) {serving or 'none'}")
            self.loaded[model] = fp
            return
        if bad.keys() & set(wanted):
            target = select_versions(policy, [v for v in fp.versions if v not in bad])
            if not target or served_config is None:
                log(f"update: model '{model}': no valid version to load; still serving version(s) {serving or 'none'}")
                self.loaded[model] = fp
                return
            if sorted(map(str, target)) == serving and previous is not None and previous.config == fp.config:
                log(f"update: model '{model}': still serving version(s) {', '.join(serving)}")
                self.loaded[model] = fp
                return
            if previous is not None and previous.config != fp.config:
                log(f"update: model '{model}': config.pbtxt changed too; it applies once the refused version is "
                    f"fixed or removed")
            config = dict(served_config, version_policy={"specific": {"versions": target}})
            log(f"update: loading model '{model}' version(s) {target} (refused: {sorted(bad)})")
            status, message = self.admin.load(model, config)
        else:
            log(f"update: loading model '{model}' (version(s) {wanted})")
            status, message = self.admin.load(model)
        self.instances.clear()
        if status == 200:
            log(f"update: model '{model}' now serves version(s) "
                f"{', '.join(sorted(ready_versions(self.admin.index()).get(model, ())))}")
        else:
            for entry in self.admin.index():
                version = entry.get("version", "")
                if (entry.get("name") == model and entry.get("state") == "UNAVAILABLE" and version.isdigit()
                        and entry.get("reason", "unloaded") != "unloaded" and int(version) in fp.versions):
                    self.refused[(model, int(version))] = (fp.versions[int(version)], entry["reason"][:300])
            log(f"update: Triton refused model '{model}' (HTTP {status}): {message[:500]}; still serving "
                f"version(s) {', '.join(sorted(ready_versions(self.admin.index()).get(model, ()))) or 'none'}")
        reload_lost(self.admin, before)
        self.loaded[model] = fp


# ------------------------------------------------------------------------------------------------- stopping

# While stopping, the service's name answers every request with UNAVAILABLE (retry elsewhere), from this model.
STOPPING_VERSION = 999999
STOPPING_MODEL_PY = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        error = pb_utils.TritonError("the service is shutting down: retry the request (on another instance)",
                                     pb_utils.TritonError.UNAVAILABLE)
        return [pb_utils.InferenceResponse(error=error) for _ in requests]
"""


def drain(admin: Admin, model: str, timeout: float) -> bool:
    """Refuse new requests with UNAVAILABLE, let those in flight finish, unload every model. True when done.

    Why not Triton's own SIGTERM handling: it stops every model's scheduler at once, which fails ensemble
    requests between two steps ("scheduler for model has stopped accepting new inference requests"), and while
    it unloads the models it answers NOT_FOUND ("has no available versions"), which clients take as final.
    So the ensemble is swapped, through the repository API, for a one-line model that answers UNAVAILABLE
    (version STOPPING_VERSION, its file sent with the request): Triton switches new requests to it at once and
    unloads the ensemble's own versions only when their in-flight requests have completed (exactly what the
    repository index shows). Then the composing models are unloaded (finishing requests sent to them directly).
    Afterwards Triton holds nothing but the refusing model and can be stopped without waiting.
    """
    deadline = time.monotonic() + timeout

    def wait_unavailable(keep) -> bool:
        while time.monotonic() < deadline:
            # UNLOADING while requests are in flight; UNAVAILABLE once the last one has completed.
            if all(m.get("state") == "UNAVAILABLE" for m in admin.index() if keep(m)):
                return True
            time.sleep(0.1)
        return False

    try:
        served = admin.config(model)
        refusing = {"name": model, "backend": "python", "max_batch_size": served.get("max_batch_size", 0),
                    "input": served.get("input", []), "output": served.get("output", []),
                    "version_policy": {"specific": {"versions": [STOPPING_VERSION]}},
                    "instance_group": [{"kind": "KIND_CPU", "count": 1}]}
        status, message = admin.load(model, refusing, {f"{STOPPING_VERSION}/model.py": STOPPING_MODEL_PY.encode()})
        if status != 200:  # still drained, but requests get NOT_FOUND instead of UNAVAILABLE meanwhile
            log(f"could not switch '{model}' to refusing new requests (HTTP {status}: {message[:300]}); unloading it")
            admin.unload(model)
        if not wait_unavailable(lambda m: m.get("name") == model and m.get("version") != str(STOPPING_VERSION)):
            return False
        others = set(ready_versions(admin.index())) - {model}
        for name in sorted(others):
            admin.unload(name)
        return wait_unavailable(lambda m: m.get("name") in others)
    except OSError as exc:
        log(f"drain through the repository API failed ({exc}); stopping Triton directly")
        return False
