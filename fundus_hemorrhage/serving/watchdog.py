"""The stub watchdog: finds tritonserver's Python backend stub processes through /proc, restarts a model whose
stub died, and removes the shared memory the dead stub left.

Why: Triton 2.51 answers "Stub process ... is not healthy" for a dead stub's instance until the model is reloaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .admin import Admin

log = logging.getLogger(__name__)

SHM_PREFIX = "triton_python_backend_shm_region_"
RESTART_MARKER = "serve_py_restart"  # config parameter that makes a restart's config differ from the served one


@dataclass(frozen=True)
class Stub:
    pid: int
    model_py: Path  # <repository>/<model>/<version>/model.py
    shm_region: str  # name under /dev/shm


def python_stubs(parent_pid: int) -> list[Stub]:
    """Live Python backend stub processes among the children of tritonserver (`parent_pid`).

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
    """Remove a stub's shared-memory region (only names of the Python backend's own regions)."""
    if region.startswith(SHM_PREFIX):
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{region}")


def instance_count(config: dict) -> int | None:
    """Stub processes a loaded Python-backend model version runs (its served JSON config); None for other
    backends (no stubs)."""
    if config.get("backend") != "python":
        return None
    groups = config.get("instance_group") or [{}]
    return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus") or [])) for g in groups)


class StubWatchdog:
    """check() compares the stubs alive with the instances each READY Python model version should run, and
    restarts a model short of stubs twice in a row (once may be a load that is just starting)."""

    def __init__(self, admin: Admin, repository: Path, triton_pid: int):
        self.admin, self.repository, self.triton_pid = admin, repository, triton_pid
        self.instances: dict[tuple[str, str], int | None] = {}  # (model, version) -> stubs expected
        self.suspect: set[tuple[str, str]] = set()
        self.restarts: list[dict] = []
        self.known_stubs: dict[int, Stub] = {stub.pid: stub for stub in python_stubs(triton_pid)}

    def forget_configs(self) -> None:
        """After any load: instance counts are read again from the served configs."""
        self.instances.clear()

    def expected_instances(self, model: str, version: str, fresh: bool = False) -> int | None:
        key = (model, version)
        if fresh or key not in self.instances:
            self.instances[key] = instance_count(self.admin.config(model, version))
        return self.instances[key]

    def check(self) -> None:
        ready = self.admin.ready_versions()
        live = python_stubs(self.triton_pid)
        stubs = stub_counts(live, self.repository)
        self.known_stubs.update({stub.pid: stub for stub in live})
        short = set()
        for model, versions in ready.items():
            for version in versions:
                expected = self.expected_instances(model, version)
                if expected and stubs.get((model, version), 0) < expected:
                    short.add((model, version))
        # Re-checked against the served config: an admin may have changed the instance count.
        confirmed = {key for key in short & self.suspect
                     if stubs.get(key, 0) < (self.expected_instances(*key, fresh=True) or 0)}
        self.suspect = short - confirmed
        for model in sorted({m for m, _ in confirmed}):
            versions = sorted(v for m, v in confirmed if m == model)
            have = {v: stubs.get((model, v), 0) for v in versions}
            log.info("watchdog: model '%s' version(s) %s runs %s stub process(es), expected %s: restarting it",
                     model, ", ".join(versions), have, [self.instances.get((model, v)) for v in versions])
            self.restart(model, ready)

    def restart(self, model: str, ready: dict[str, set[str]]) -> None:
        """Reload exactly the versions that were being served, with the served config.

        Triton keeps the instances of a model whose config did not change (the dead one included): a marker
        parameter makes the config differ, so that every instance is created anew.
        """
        start = time.monotonic()
        config = self.admin.config(model)
        config["version_policy"] = {"specific": {"versions": sorted(int(v) for v in ready.get(model, ()))}}
        config.setdefault("parameters", {})[RESTART_MARKER] = {"string_value": str(time.time_ns())}
        status, message = self.admin.load(model, config)
        self.forget_configs()
        self.admin.reload_lost(ready)
        self.forget_dead_stubs(model)
        elapsed = time.monotonic() - start
        self.restarts.append({"model": model, "status": status, "seconds": round(elapsed, 2)})
        if status == 200:
            log.info("watchdog: model '%s' restarted in %.1f s", model, elapsed)
        else:
            log.info("watchdog: restarting model '%s' failed (HTTP %s): %s", model, status, message[:500])

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
