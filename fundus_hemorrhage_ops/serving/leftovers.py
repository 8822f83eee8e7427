"""What tritonserver leaves on the machine when it is killed or crashes, and how serve.py removes it, only where it
knows whose it is.

* Python-backend shared memory, /dev/shm/triton_python_backend_shm_region_<uuid>: one region per stub (tens of MB
  each once requests passed through). Triton removes a region when it unloads the model; a killed or crashed
  tritonserver leaves all of them. At start-up serve.py removes the regions that no process maps or holds open
  (/proc/<pid>/maps and fd), that are older than SHM_GRACE_S (a region being created for a stub that has not
  opened it yet is younger) and that this user owns: their tritonserver is gone. A region that a live server of
  another serve.py uses is mapped by its tritonserver and its stub, so it stays.
* /tmp/folderXXXXXX: Triton writes the files of a load through the repository API (readiness.py, drain.py) there
  (the path is fixed in Triton's core; TMPDIR is not read) and removes the folder when that model is unloaded,
  never when killed. serve.py adds a marker file naming its run (runs.run_id) to every such load
  (admin.Admin(marker=...)); a folder is removed once the run it names is over: at the end of the run and at any
  later start.
* /tmp/python_env_XXXXXX: the Python backend makes one per tritonserver process (path fixed in the backend) and
  removes it only on a clean backend shutdown, which serve.py's drain (a kill once everything is unloaded) never
  reaches. serve.py claims the folders that appeared while its tritonserver started, when no other tritonserver
  started between its own start and the folder's creation (so the folder cannot be another's), records them in
  the run's run.json, and removes them when that generation has ended; a later start removes those of a run that
  was killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

from .admin import MARKER
from .runs import id_alive, read_run
from .watchdog import SHM_PREFIX

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_GRACE_S = 30.0
TMP_DIR = Path("/tmp")
PYTHON_ENV_GLOB = "python_env_*"
FOLDER_GLOB = "folder*"


def _pids() -> list[str]:
    return [e for e in os.listdir("/proc") if e.isdigit()]


def shm_regions_in_use(shm_dir: Path = SHM_DIR) -> set[str]:
    """Names of the Python-backend regions in `shm_dir` that some visible process maps or holds open."""
    prefix = f"{shm_dir}/{SHM_PREFIX}"
    mapped = re.compile(re.escape(prefix.encode()) + rb"([^\s/]+)")
    used: set[str] = set()
    for pid in _pids():
        with contextlib.suppress(OSError):
            used.update(SHM_PREFIX + m.decode(errors="replace")
                        for m in mapped.findall(Path(f"/proc/{pid}/maps").read_bytes()))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(prefix):
                        used.add(SHM_PREFIX + target[len(prefix):].split(" ")[0])
    return used


def stale_shm_regions(grace_s: float = SHM_GRACE_S, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Python-backend regions whose tritonserver is gone: mapped and held open by no process, older than
    `grace_s`, owned by this user (root: any)."""
    try:
        candidates = [p for p in shm_dir.iterdir() if p.name.startswith(SHM_PREFIX)]
    except OSError:
        return []
    if not candidates:
        return []
    used = shm_regions_in_use(shm_dir)
    now, uid = time.time(), os.geteuid()
    stale = []
    for path in candidates:
        try:
            st = path.stat()
        except OSError:
            continue
        if path.name in used or now - st.st_mtime < grace_s or (uid != 0 and st.st_uid != uid):
            continue
        stale.append(path)
    return sorted(stale)


def remove_stale_shm(grace_s: float = SHM_GRACE_S, shm_dir: Path = SHM_DIR) -> tuple[int, int]:
    """Remove the stale regions (stale_shm_regions); (how many, bytes they held in /dev/shm)."""
    count = freed = 0
    for path in stale_shm_regions(grace_s, shm_dir):
        # Checked again just before: a region found stale a moment ago is not mapped by anyone now either.
        if path.name in shm_regions_in_use(shm_dir):
            continue
        try:
            size = path.stat().st_blocks * 512
            path.unlink()
        except OSError:
            continue
        count, freed = count + 1, freed + size
    return count, freed


def marked_folders(tmp_dir: Path = TMP_DIR) -> dict[Path, str]:
    """Triton's repository-API folders that carry a serve.py marker: folder -> the run_id it names."""
    out = {}
    for folder in tmp_dir.glob(FOLDER_GLOB):
        with contextlib.suppress(OSError):
            markers = list(folder.glob(f"*/{MARKER}"))
            if folder.is_dir() and markers:
                out[folder] = markers[0].read_text().strip()
    return out


def remove_folders_of(run_ids: set[str] | None = None, tmp_dir: Path = TMP_DIR) -> int:
    """Remove the marked folders of the runs `run_ids`, or (None) of every run that is over; how many."""
    removed = 0
    for folder, owner in marked_folders(tmp_dir).items():
        if (owner in run_ids) if run_ids is not None else not id_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed += not folder.exists()
    return removed


def python_env_dirs(tmp_dir: Path = TMP_DIR) -> set[Path]:
    return {p for p in tmp_dir.glob(PYTHON_ENV_GLOB) if p.is_dir()}


_BOOT_TIME: float | None = None
_TICKS = os.sysconf("SC_CLK_TCK")


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, 1/CLK_TCK resolution); None if it is gone."""
    global _BOOT_TIME
    if _BOOT_TIME is None:
        with contextlib.suppress(OSError, StopIteration, ValueError):
            _BOOT_TIME = float(next(line for line in Path("/proc/stat").read_text().splitlines()
                                    if line.startswith("btime")).split()[1])
    try:
        start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return (_BOOT_TIME or 0.0) + start / _TICKS


def tritonserver_start_times(exclude: int) -> list[float]:
    """Start times of the other tritonserver processes now visible."""
    out = []
    for pid in _pids():
        if int(pid) == exclude:
            continue
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
                start = process_start_time(int(pid))
                if start is not None:
                    out.append(start)
    return out


def claim_python_envs(before: set[Path], triton_pid: int, tmp_dir: Path = TMP_DIR) -> tuple[list[Path], list[Path]]:
    """(claimed, not claimed): the python_env folders new since `before` that tritonserver `triton_pid` made.
    A new folder is claimed when it was created after that tritonserver started and no other tritonserver started
    in between (then it cannot be another's); the others are left alone (logged by the caller)."""
    ours = process_start_time(triton_pid)
    new = sorted(python_env_dirs(tmp_dir) - before)
    if ours is None or not new:
        return [], new
    others = tritonserver_start_times(triton_pid)
    claimed, unclaimed = [], []
    slack = 2.0 / _TICKS  # start times have clock-tick resolution
    for path in new:
        try:
            created = path.stat().st_ctime
        except OSError:
            continue
        if created + slack >= ours and not any(ours - slack <= s <= created + slack for s in others):
            claimed.append(path)
        else:
            unclaimed.append(path)
    return claimed, unclaimed


def remove_dirs(paths) -> int:
    removed = 0
    for path in paths:
        path = Path(path)
        if path.name.startswith("python_env_") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += not path.exists()
    return removed


def sweep_stale_runs(stale_dirs: list[Path]) -> dict[str, int]:
    """At start-up: for each run folder whose serve.py is gone, remove its claimed python_env folders and the
    folder itself; then every marked repository-API folder of a run that is over, and the stale shared memory."""
    envs = 0
    for run_dir in stale_dirs:
        run = read_run(run_dir)
        if run is not None:
            envs += remove_dirs(run.info.get("python_env", []))
        shutil.rmtree(run_dir, ignore_errors=True)
    folders = remove_folders_of(None)
    regions, freed = remove_stale_shm()
    return {"runs": len(stale_dirs), "python_env": envs, "folders": folders, "shm_regions": regions,
            "shm_bytes": freed}
