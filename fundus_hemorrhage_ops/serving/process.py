"""tritonserver as a child that serve.py owns: its own session, killed when serve.py dies, restartable, its
orphaned stubs reaped.

* Own session (start_new_session): a terminal's Ctrl-C or systemd's SIGTERM to the control group reaches
  serve.py only, which drains (drain.py); before, the signal reached tritonserver directly and every request in
  flight failed ("scheduler for model has stopped accepting new inference requests").
* PR_SET_PDEATHSIG: if serve.py itself is SIGKILLed, the kernel kills tritonserver (and the proxy) too, so no
  orphan keeps the ports.
* PR_SET_CHILD_SUBREAPER on serve.py: the stubs that outlive a tritonserver generation (and the zombies Triton
  2.51 never reaps, watchdog.py) become serve.py's children, and reap_orphans() collects them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def child_setup(death_signal: int) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets `death_signal` when serve.py's thread that started it ends (serve.py
    starts its children from the main thread, which lives as long as the process)."""
    def setup() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() == 1:  # serve.py died before prctl ran
            os.kill(os.getpid(), death_signal)
    return setup


def become_subreaper() -> bool:
    """Orphaned descendants (stubs of a dead tritonserver) are re-parented to this process instead of init."""
    return _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


STUB_COMM = "triton_python_b"  # a stub's /proc/<pid>/stat name (15 characters), kept by a zombie


def reap_orphans() -> list[int]:
    """Wait for every zombie child of this process that is a Python backend stub (re-parented here when its
    tritonserver ended). Only stubs: the other children are waited for by their own Popen (a validation
    subprocess reaped here would read as exit code 0). Returns the pids reaped."""
    reaped = []
    me = os.getpid()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        pid = int(entry)
        try:
            head, tail = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)
            state, ppid = tail.split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == me and state == "Z" and head.split("(", 1)[-1] == STUB_COMM:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.append(pid)
            except ChildProcessError:
                pass
    return reaped


def zombie_children(parent_pid: int) -> list[int]:
    """Children of `parent_pid` in state Z (exited, never waited for)."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == parent_pid and state == "Z":
            out.append(int(entry))
    return out


class TritonProcess:
    """The current tritonserver generation: start() (again after a crash), and the Popen methods the drain uses
    (poll, wait, kill, send_signal, pid), applied to the current generation."""

    def __init__(self, command: list[str], env: dict):
        self.command, self.env = command, env
        self.popen: subprocess.Popen | None = None
        self.generation = 0

    def start(self) -> None:
        self.popen = subprocess.Popen(self.command, env=self.env, start_new_session=True,
                                      preexec_fn=child_setup(signal.SIGKILL))
        self.generation += 1

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        self.popen.kill()

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)


def describe_exit(code: int) -> str:
    """'exit code 3' or 'signal 6 (SIGABRT)' for a Popen return code."""
    if code is not None and code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
