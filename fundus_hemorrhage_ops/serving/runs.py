"""The runs of serve.py on this machine: one folder per run, .triton/runs/<pid>/, that serve.py owns and removes.

    run.json          who runs (pid and its start time, so a reused pid is not taken for the run), what it serves
                      (--model-repository, the public HTTP URL), and what its tritonserver generations left that
                      only this run may remove (their python_env_* folders under /tmp)
    traffic.json      the live A/B split (live.py; the traffic tool edits it, serve.py applies it)
    model_repository  the repository tritonserver serves (live.py): the source's files through symbolic links,
                      with config.pbtxt generated where the live split changes it

A run whose process is gone (killed, or its machine's serve.py crashed) is stale: the next serve.py start removes
its folder and what it recorded (leftovers.py). Nothing here ever touches --model-repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

RUNTIME_DIR = Path(__file__).resolve().parents[2] / ".triton"  # serve.py's work folder in this checkout (gitignored)
RUN_FILE = "run.json"


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None if it is gone
    or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int, start: int | None) -> bool:
    """Process `pid` runs and is the one that started at `start` (not a later process given the same pid)."""
    now = process_start(pid)
    return now is not None and (start is None or now == start)


def run_id(pid: int | None = None) -> str:
    """'<pid>:<start ticks>': names one process for as long as the machine runs (marker files use it)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{process_start(pid)}"


def id_alive(identity: str) -> bool:
    """Whether the process a run_id() names still runs (False for anything that is not one)."""
    pid, _, start = identity.strip().partition(":")
    if not pid.isdigit() or not start.isdigit():
        return False
    return is_alive(int(pid), int(start))


def write_json(path: Path, data: dict) -> None:
    """Write `path` atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class Run:
    """One serve.py run's folder and record."""
    dir: Path
    pid: int
    start: int | None
    info: dict = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.dir / RUN_FILE

    @property
    def model_repository(self) -> Path | None:
        source = self.info.get("model_repository")
        return Path(source) if source else None

    @property
    def http_url(self) -> str | None:
        return self.info.get("http_url")

    def alive(self) -> bool:
        return is_alive(self.pid, self.start)

    def update(self, **values) -> None:
        """Record `values` in run.json (serve.py's own run only)."""
        self.info.update(values)
        write_json(self.file, {"pid": self.pid, "start": self.start, **self.info})

    def claim(self, key: str, items) -> None:
        """Add `items` to the list `key` of run.json (what this run must remove at its end)."""
        current = list(self.info.get(key, []))
        self.update(**{key: current + [i for i in items if i not in current]})

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def create_run(runtime_dir: Path = RUNTIME_DIR, **info) -> Run:
    """This process's run folder, fresh (a stale one left under the same pid is removed first)."""
    pid = os.getpid()
    run_dir = Path(runtime_dir) / "runs" / str(pid)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    run = Run(run_dir, pid, process_start(pid))
    run.update(**info)
    return run


def read_run(run_dir: Path) -> Run | None:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
        pid, start = int(data.pop("pid")), data.pop("start", None)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Run(run_dir, pid, start, data)


def all_runs(runtime_dir: Path = RUNTIME_DIR) -> list[Run]:
    """Every run folder with a readable record (alive or stale), oldest pid first."""
    root = Path(runtime_dir) / "runs"
    runs = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name) if root.is_dir() else []:
        run = read_run(entry) if entry.is_dir() else None
        if run is not None:
            runs.append(run)
    return runs


def live_runs(runtime_dir: Path = RUNTIME_DIR) -> list[Run]:
    return [run for run in all_runs(runtime_dir) if run.alive()]


def stale_run_dirs(runtime_dir: Path = RUNTIME_DIR, grace_s: float = 60.0) -> list[Path]:
    """Run folders whose serve.py is gone: a record naming a dead process, or no readable record and older than
    `grace_s` (a folder being created has none for a moment)."""
    root = Path(runtime_dir) / "runs"
    out = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_dir():
            continue
        run = read_run(entry)
        if run is not None:
            if not run.alive():
                out.append(entry)
        else:
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > grace_s:
                    out.append(entry)
    return out


def find_run(url: str | None = None, model_repository: Path | None = None,
             runtime_dir: Path = RUNTIME_DIR) -> Run:
    """The live serve.py run answering `url` (its public HTTP URL; the port decides), else the only one serving
    `model_repository`. Raises LookupError saying what was found instead."""
    runs = live_runs(runtime_dir)
    if url:
        port = url.rstrip("/").rsplit(":", 1)[-1]
        matches = [r for r in runs if (r.http_url or "").rstrip("/").rsplit(":", 1)[-1] == port]
        if not matches:
            raise LookupError(f"no serve.py run of this checkout ({runtime_dir}) serves {url}; running: "
                              f"{', '.join(r.http_url or '?' for r in runs) or 'none'}")
        return matches[0]
    if model_repository is not None:
        wanted = Path(model_repository).resolve()
        runs = [r for r in runs if r.model_repository == wanted]
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise LookupError(f"no serve.py is serving {model_repository or 'a repository'} from this checkout "
                          f"({runtime_dir}): start one (serve.py --traffic SPLIT sets the split at start)")
    raise LookupError(f"{len(runs)} serve.py runs serve {model_repository}: choose one with --url "
                      f"({', '.join(r.http_url or '?' for r in runs)})")
