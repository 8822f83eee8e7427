"""The drain on SIGTERM or SIGINT: new requests are answered UNAVAILABLE (retry elsewhere), those in flight
finish, every model is unloaded, then Triton is stopped.

Why not Triton's own SIGTERM handling: it stops every model's scheduler at once, which fails ensemble requests
between two steps ("scheduler for model has stopped accepting new inference requests"), and while it unloads
the models it answers NOT_FOUND ("has no available versions"), which clients take as final.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from typing import Callable

from .admin import Admin
from .readiness import NOT_READY_MODEL, withdraw_readiness  # noqa: F401  (NOT_READY_MODEL: for callers)
from .watchdog import python_stubs, remove_shm

log = logging.getLogger(__name__)

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
    """Refuse new requests to `model` with UNAVAILABLE, let those in flight finish, unload every model. True when
    done within `timeout` seconds.

    The model is swapped, through the repository API, for a one-line model that answers UNAVAILABLE (version
    STOPPING_VERSION, its file sent with the request): Triton switches new requests to it at once and unloads
    the model's own versions only when their in-flight requests have completed (exactly what the repository
    index shows). Then the other models are unloaded (finishing requests sent to them directly). Afterwards
    Triton holds nothing but the refusing model and can be stopped without waiting.
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
        withdraw_readiness(admin)
        served = admin.config(model)
        refusing = {"name": model, "backend": "python", "max_batch_size": served.get("max_batch_size", 0),
                    "input": served.get("input", []), "output": served.get("output", []),
                    "version_policy": {"specific": {"versions": [STOPPING_VERSION]}},
                    "instance_group": [{"kind": "KIND_CPU", "count": 1}]}
        status, message = admin.load(model, refusing, {f"{STOPPING_VERSION}/model.py": STOPPING_MODEL_PY.encode()})
        if status != 200:  # still drained, but requests get NOT_FOUND instead of UNAVAILABLE meanwhile
            log.info("could not switch '%s' to refusing new requests (HTTP %s: %s); unloading it", model, status,
                     message[:300])
            admin.unload(model)
        if not wait_unavailable(lambda m: m.get("name") == model and m.get("version") != str(STOPPING_VERSION)):
            return False
        others = set(admin.ready_versions()) - {model}
        for name in sorted(others):
            admin.unload(name)
        return wait_unavailable(lambda m: m.get("name") in others)
    except OSError as exc:
        log.info("drain through the repository API failed (%s); stopping Triton directly", exc)
        return False


class Drain:
    """On SIGTERM or SIGINT (install()) or request(): drain `model`, then stop the tritonserver `process`.

    `lock` is held while draining, so that no model update or restart of the supervisor runs meanwhile.
    `on_request` callbacks run at once when the stop is requested, before the drain (e.g. to stop answering
    readiness probes).
    """

    def __init__(self, admin: Admin, process: subprocess.Popen, model: str, timeout: float,
                 lock: threading.Lock):
        self.admin, self.process, self.model, self.timeout, self.lock = admin, process, model, timeout, lock
        self.requested = threading.Event()
        self.on_request: list[Callable[[], None]] = []
        self.thread = threading.Thread(target=self._run, name="drain", daemon=True)

    def install(self) -> "Drain":
        """Handle SIGTERM and SIGINT (main thread only) and start the thread that waits for them."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.thread.start()
        return self

    def _on_signal(self, signum, _frame) -> None:
        if not self.requested.is_set():
            print(f"serve.py: {signal.Signals(signum).name}: draining in-flight requests, then stopping", flush=True)
        self.request()

    def request(self) -> None:
        if self.requested.is_set():
            return
        for callback in self.on_request:
            callback()
        self.requested.set()

    def stopping(self) -> bool:
        return self.requested.is_set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        self.requested.wait()
        if self.process.poll() is not None:
            return
        with self.lock:
            drained = drain(self.admin, self.model, self.timeout)
        if not drained:
            self.process.send_signal(signal.SIGTERM)  # Triton's own stop: waits up to --exit-timeout-secs
            return
        # Nothing is in flight and only the refusing model is loaded. Triton's graceful stop would answer
        # NOT_FOUND while it unloads that one too (and after a crashed stub or a refused load, Triton 2.51 waits
        # its whole --exit-timeout for an instance it never releases): stop it at once; new connections are
        # then refused (UNAVAILABLE). The stub exits with its parent; its shared memory is removed here.
        stubs = python_stubs(self.process.pid)
        self.process.kill()
        self.process.wait()
        for stub in stubs:
            remove_shm(stub.shm_region)
        log.info("all requests completed and every model unloaded; Triton stopped")
