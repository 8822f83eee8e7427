"""The supervisor thread: runs the stub watchdog and the model-update poller at their intervals, one at a time,
under the lock that the drain also takes (so no reload runs while draining)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from .admin import Admin
from .updates import UpdatePoller
from .watchdog import StubWatchdog

log = logging.getLogger(__name__)


class Supervisor(threading.Thread):
    """Restarts models whose stub died (every `watchdog_interval` s) and loads model updates (every
    `poll_interval` s), keeping the served version when a new one is bad. An interval of 0 disables that task.
    `on_leak(reason)`: the watchdog found a generation Triton will never release (serve.py recycles Triton)."""

    def __init__(self, admin: Admin, repository: Path, triton_pid: int, watchdog_interval: float,
                 poll_interval: float, stopping: threading.Event, lock: threading.Lock,
                 on_leak: Callable[[str], None] = lambda reason: None, loaded: dict | None = None,
                 sync: Callable[[], None] | None = None):
        super().__init__(name="supervisor", daemon=True)
        self.admin, self.repository, self.triton_pid = admin, repository, triton_pid
        self.watchdog_interval, self.poll_interval = watchdog_interval, poll_interval
        self.stopping, self.lock, self.on_leak = stopping, lock, on_leak
        self.loaded = loaded  # the repository's state when tritonserver started (updates.repository_state)
        self.sync = sync  # brings the served repository up to date before each poll (live.LiveRepository.sync)
        self.watchdog: StubWatchdog | None = None

    def shm_regions(self) -> set[str]:
        """Shared-memory regions of every stub the watchdog saw (to remove once tritonserver has ended)."""
        return self.watchdog.shm_regions() if self.watchdog is not None else set()

    def run(self) -> None:
        watchdog = self.watchdog = StubWatchdog(self.admin, self.repository, self.triton_pid, self.on_leak)
        updates = UpdatePoller(self.admin, self.repository, on_load=watchdog.forget_configs, loaded=self.loaded)

        def poll() -> None:
            if self.sync is not None:
                self.sync()
            updates.poll()

        tasks = [(interval, task) for interval, task in ((self.watchdog_interval, watchdog.check),
                                                         (self.poll_interval, poll)) if interval > 0]
        due = [time.monotonic() + interval for interval, _ in tasks]
        while not self.stopping.wait(0.25):
            for i, (interval, task) in enumerate(tasks):
                if time.monotonic() < due[i] or self.stopping.is_set():
                    continue
                try:
                    with self.lock:
                        if not self.stopping.is_set():
                            task()
                except Exception as exc:  # the supervisor must outlive any single failure
                    log.info("supervisor: %s failed: %r", task.__qualname__, exc)
                due[i] = time.monotonic() + interval
