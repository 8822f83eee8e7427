"""The stub watchdog: finds tritonserver's Python backend stub processes through /proc, restarts a model whose
stub died, withdraws readiness while it cannot serve, and asks for a recycle of tritonserver when Triton keeps
a dead generation it will never release.

Triton 2.51 behaviour (measured, tests/test_crash_recovery.py):
* A dead stub's instance answers "Stub process '<model>_0_1' is not healthy" until the model is reloaded with a
  changed config (a reload with the same config keeps the dead instance).
* Each instance is a stub whose command line names it (`<model>_<group>_<index>`); a reload starts a new stub
  per instance under the same names. So stubs are tracked per (model, version, instance), the newest start time
  being the current generation: counting stubs per model is not enough, because...
* ...when requests were in flight on the killed stub, Triton never finishes unloading that generation: its
  surviving stubs stay alive (and were counted as alive before), the killed ones stay zombies (Triton's thread
  waits for the dead stub's answer forever, so it never calls waitpid), and their shared memory stays.
  Only the end of the tritonserver process releases them: check() then calls `on_leak`, and serve.py recycles
  tritonserver (drain, stop, start; launcher.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .admin import Admin
from .readiness import restore_readiness, withdraw_readiness
from .process import zombie_children

log = logging.getLogger(__name__)

SHM_PREFIX = "triton_python_backend_shm_region_"
RESTART_MARKER = "serve_py_restart"  # config parameter that makes a restart's config differ from the served one
RELEASE_GRACE_S = 15.0  # after a restart, how long Triton may take to release the previous generation


@dataclass(frozen=True)
class Stub:
    pid: int
    model_py: Path  # <repository>/<model>/<version>/model.py
    shm_region: str  # name under /dev/shm
    instance: str  # Triton's instance name, e.g. preprocess_0_1
    start: int  # start time, clock ticks since boot (/proc/<pid>/stat field 22)

    @property
    def model(self) -> str:
        return self.model_py.parent.parent.name

    @property
    def version(self) -> str:
        return self.model_py.parent.name

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.version, self.instance


def python_stubs(parent_pid: int) -> list[Stub]:
    """Live Python backend stub processes among the children of tritonserver (`parent_pid`).

    A stub's command line is `triton_python_backend_stub <repository>/<model>/<version>/model.py <shm region>
    <shm size> <shm growth> <parent pid> <backend dir> <ipc handle> <instance name> ...`.
    """
    stubs = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            state, ppid, start = fields[0], int(fields[1]), int(fields[19])
            if ppid != parent_pid or state in ("Z", "X"):
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
            instance = os.fsdecode(argv[8]) if len(argv) > 8 else ""
            stubs.append(Stub(int(entry), Path(os.fsdecode(argv[1])), os.fsdecode(argv[2]), instance, start))
    return stubs


def is_zombie(pid: int) -> bool:
    """True for a process that has exited and was not reaped (a killed stub: Triton 2.51 never waits for it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


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
    """check(): for each READY Python model version, the current stub of each instance (the newest started) must
    be alive. A current stub that died and is a zombie (killed: Triton does not reap it): restart the model at once
    (readiness withdrawn meanwhile). A current stub that is gone altogether is also what a reload through the
    repository API looks like between the old generation's exit and the new one's start: restart only if no newer
    stub has appeared by the next check (an admin's reload was taken for a crash before). Fewer
    instances with a stub than configured, none of them seen dying (a load starting?): restart if it persists
    one more check. A previous generation that Triton has not released RELEASE_GRACE_S after a restart, or
    zombie stubs: `on_leak(reason)`."""

    def __init__(self, admin: Admin, repository: Path, triton_pid: int,
                 on_leak: Callable[[str], None] = lambda reason: None):
        self.admin, self.repository, self.triton_pid, self.on_leak = admin, repository, triton_pid, on_leak
        self.instances: dict[tuple[str, str], int | None] = {}  # (model, version) -> stubs expected
        self.suspect: set[tuple[str, str]] = set()
        self.vanished: set[int] = set()  # pids of current stubs gone without a zombie, seen once
        self.restarts: list[dict] = []
        self.known_stubs: dict[int, Stub] = {}  # every stub seen, by pid (their shm is removed at the end)
        self.current: dict[tuple[str, str, str], Stub] = {}  # (model, version, instance) -> newest stub seen
        self.previous_generation: dict[int, float] = {}  # pid of a stub replaced by a restart -> restart time
        self.leak_reported = False
        self._observe(python_stubs(triton_pid))

    def forget_configs(self) -> None:
        """After any load: instance counts are read again from the served configs."""
        self.instances.clear()

    def expected_instances(self, model: str, version: str, fresh: bool = False) -> int | None:
        key = (model, version)
        if fresh or key not in self.instances:
            self.instances[key] = instance_count(self.admin.config(model, version))
        return self.instances[key]

    def _observe(self, live: list[Stub]) -> None:
        for stub in live:
            if stub.model_py.parent.parent.parent != self.repository:
                continue
            self.known_stubs[stub.pid] = stub
            now = self.current.get(stub.key)
            if now is None or (stub.start, stub.pid) > (now.start, now.pid):
                self.current[stub.key] = stub

    def check(self) -> None:
        ready = self.admin.ready_versions()
        live = python_stubs(self.triton_pid)
        self._observe(live)
        alive = {stub.pid for stub in live}
        crashed: dict[str, list[str]] = {}  # model -> instances whose current stub died
        short, vanished = set(), set()
        for model, versions in ready.items():
            for version in versions:
                expected = self.expected_instances(model, version)
                if not expected:
                    continue
                current = [s for k, s in self.current.items() if k[:2] == (model, version)]
                gone = [s for s in current if s.pid not in alive]
                vanished |= {s.pid for s in gone if not is_zombie(s.pid)}
                dead = [s.instance for s in gone if is_zombie(s.pid) or s.pid in self.vanished]
                if dead:
                    crashed.setdefault(model, []).extend(dead)
                elif len(current) < expected:
                    short.add((model, version))
        # A shortfall without a death seen: re-checked against the served config, and acted on the second time.
        confirmed = {key for key in short & self.suspect
                     if sum(k[:2] == key and s.pid in alive for k, s in self.current.items())
                     < (self.expected_instances(*key, fresh=True) or 0)}
        self.suspect = short - confirmed
        self.vanished = vanished
        for model, _ in confirmed:
            crashed.setdefault(model, [])
        if crashed:
            withdraw_readiness(self.admin)
            ok = True
            for model in sorted(crashed):
                log.info("watchdog: model '%s': the stub process of instance(s) %s died (or never started): "
                         "restarting it", model, ", ".join(sorted(crashed[model])) or "?")
                ok = self.restart(model, ready) and ok
            if ok:
                restore_readiness(self.admin)
        self.check_release()

    def restart(self, model: str, ready: dict[str, set[str]]) -> bool:
        """Reload exactly the versions that were being served, with the served config; True when Triton
        loaded it.

        Triton keeps the instances of a model whose config did not change (the dead one included): a marker
        parameter makes the config differ, so that every instance is created anew.
        """
        start = time.monotonic()
        replaced = [s for s in self.current.values() if s.model == model]
        config = self.admin.config(model)
        config["version_policy"] = {"specific": {"versions": sorted(int(v) for v in ready.get(model, ()))}}
        config.setdefault("parameters", {})[RESTART_MARKER] = {"string_value": str(time.time_ns())}
        status, message = self.admin.load(model, config)
        self.forget_configs()
        self.admin.reload_lost(ready)
        for stub in replaced:
            self.current.pop(stub.key, None)
            self.previous_generation[stub.pid] = time.monotonic()
        self._observe(python_stubs(self.triton_pid))
        elapsed = time.monotonic() - start
        self.restarts.append({"model": model, "status": status, "seconds": round(elapsed, 2)})
        if status == 200:
            log.info("watchdog: model '%s' restarted in %.1f s", model, elapsed)
        else:
            log.info("watchdog: restarting model '%s' failed (HTTP %s): %s", model, status, message[:500])
        return status == 200

    def check_release(self) -> None:
        """Stubs of a replaced generation should end within RELEASE_GRACE_S (Triton unloads it); their shared
        memory is removed once they have. One that stays, or a zombie stub, means Triton will never release
        that generation: on_leak."""
        alive = {stub.pid for stub in python_stubs(self.triton_pid)}
        now = time.monotonic()
        stuck = []
        for pid, since in list(self.previous_generation.items()):
            if pid not in alive:
                stub = self.known_stubs.get(pid)
                if stub is not None and not os.path.exists(f"/proc/{pid}"):  # reaped: its region is free
                    remove_shm(stub.shm_region)
                    del self.previous_generation[pid]
            elif now - since > RELEASE_GRACE_S:
                stuck.append(pid)
        zombies = zombie_children(self.triton_pid)
        old_zombies = [pid for pid in zombies if now - self.previous_generation.get(pid, now) > RELEASE_GRACE_S]
        if (stuck or old_zombies) and not self.leak_reported:
            self.leak_reported = True
            reason = (f"{len(stuck)} stub process(es) of a replaced generation still running and "
                      f"{len(old_zombies)} zombie stub(s) {RELEASE_GRACE_S:.0f} s after the restart: Triton 2.51 "
                      "does not release a generation whose stub died with requests in flight")
            log.info("watchdog: %s", reason)
            self.on_leak(reason)

    def shm_regions(self) -> set[str]:
        """The shared-memory regions of every stub seen (removed by serve.py once tritonserver has ended)."""
        return {stub.shm_region for stub in self.known_stubs.values()}
