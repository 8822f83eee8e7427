"""What tritonserver leaves behind (fundus_hemorrhage_ops.serving.leftovers): stale Python-backend shared memory
is removed at start-up, only where no process uses it; the /tmp folders a serve.py run's tritonserver made
(python_env_*, the repository API's folder*) are removed when the run ends, or by the next start if it was killed.

The unit tests use folders of their own; the slow tests start serve.py three times."""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from fundus_hemorrhage_ops.serving import leftovers
from fundus_hemorrhage_ops.serving.admin import MARKER
from fundus_hemorrhage_ops.serving.runs import RUNTIME_DIR, process_start, run_id
from fundus_hemorrhage_ops.serving.watchdog import SHM_PREFIX, python_stubs

from conftest import start_server, stop_server


def region(shm_dir: Path, age_s: float = 3600.0, size: int = 8192) -> Path:
    path = shm_dir / f"{SHM_PREFIX}{uuid.uuid4()}"
    path.write_bytes(b"\0" * size)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_regions_nobody_uses_and_older_than_the_grace_are_removed(tmp_path):
    stale, young = region(tmp_path), region(tmp_path, age_s=1)
    mapped, held = region(tmp_path), region(tmp_path)
    other = tmp_path / "not_a_python_backend_region"
    other.write_bytes(b"x")
    os.utime(other, (0, 0))
    with open(mapped, "r+b") as f, open(held, "rb"):  # `held`: open, not mapped
        view = mmap.mmap(f.fileno(), 0)  # mapped by this process (as a stub and its tritonserver map theirs)
        os.utime(mapped, (0, 0))
        os.utime(held, (0, 0))
        try:
            assert leftovers.shm_regions_in_use(tmp_path) == {mapped.name, held.name}
            assert leftovers.stale_shm_regions(shm_dir=tmp_path) == [stale]
            assert leftovers.remove_stale_shm(shm_dir=tmp_path)[0] == 1
        finally:
            view.close()
    assert not stale.exists() and young.exists() and mapped.exists() and held.exists() and other.exists()


def test_remove_stale_shm_reports_count_and_bytes(tmp_path):
    paths = [region(tmp_path, size=1 << 16) for _ in range(3)]
    expected = sum(p.stat().st_blocks * 512 for p in paths)
    assert leftovers.remove_stale_shm(shm_dir=tmp_path) == (3, expected)
    assert not any(p.exists() for p in paths)


def test_repository_api_folders_are_removed_only_for_runs_that_are_over(tmp_path):
    def folder(owner: str) -> Path:
        path = Path(os.path.join(tmp_path, f"folder{uuid.uuid4().hex[:6]}"))
        (path / "1").mkdir(parents=True)
        (path / "1" / MARKER).write_text(owner)
        return path

    mine, dead, unmarked = folder(run_id()), folder("999999999:1"), tmp_path / "folderXYZ"
    (unmarked / "1").mkdir(parents=True)
    assert leftovers.remove_folders_of(None, tmp_path) == 1  # only the dead run's: this process is alive
    assert mine.exists() and not dead.exists() and unmarked.exists()
    assert leftovers.remove_folders_of({run_id()}, tmp_path) == 1
    assert not mine.exists() and unmarked.exists()


def test_a_python_env_folder_is_claimed_only_when_no_other_tritonserver_started_meanwhile(tmp_path, monkeypatch):
    before = leftovers.python_env_dirs(tmp_path)
    (tmp_path / "python_env_abc123").mkdir()
    me = os.getpid()  # stands for "our tritonserver": started before the folder was made
    monkeypatch.setattr(leftovers, "tritonserver_start_times", lambda exclude: [])
    assert leftovers.claim_python_envs(before, me, tmp_path) == ([tmp_path / "python_env_abc123"], [])
    started = leftovers.process_start_time(me)
    monkeypatch.setattr(leftovers, "tritonserver_start_times", lambda exclude: [started + 0.001])
    assert leftovers.claim_python_envs(before, me, tmp_path) == ([], [tmp_path / "python_env_abc123"])
    monkeypatch.setattr(leftovers, "tritonserver_start_times", lambda exclude: [started - 100])  # an older server
    assert leftovers.claim_python_envs(before, me, tmp_path)[0] == [tmp_path / "python_env_abc123"]


def tritonserver_of(server) -> int:
    out = subprocess.run(["pgrep", "-P", str(server.process.pid), "tritonserver"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def run_record(server) -> dict:
    return json.loads((RUNTIME_DIR / "runs" / str(server.process.pid) / "run.json").read_text())


def marked_folders_of(identity: str) -> list[Path]:
    return [f for f, owner in leftovers.marked_folders().items() if owner == identity]


@pytest.mark.slow
def test_a_start_and_stop_leaves_nothing_of_its_own(tmp_path):
    server = start_server(tmp_path)
    identity = f"{server.process.pid}:{process_start(server.process.pid)}"
    run_dir = RUNTIME_DIR / "runs" / str(server.process.pid)
    try:
        regions = {s.shm_region for s in python_stubs(tritonserver_of(server))}
        envs = run_record(server)["python_env"]
        assert regions and len(envs) == 1 and Path(envs[0]).is_dir()  # its Python backend's folder, claimed
    finally:
        assert stop_server(server) == 0
    assert not [r for r in regions if (Path("/dev/shm") / r).exists()]
    assert not Path(envs[0]).exists()
    assert not marked_folders_of(identity)  # the drain's loads (readiness, the refusing model) are gone too
    assert not run_dir.exists()


@pytest.mark.slow
def test_the_next_start_removes_what_a_killed_run_left(tmp_path):
    server = start_server(tmp_path / "killed")
    identity = f"{server.process.pid}:{process_start(server.process.pid)}"
    run_dir = RUNTIME_DIR / "runs" / str(server.process.pid)
    regions = [Path("/dev/shm") / s.shm_region for s in python_stubs(tritonserver_of(server))]
    envs = [Path(p) for p in run_record(server)["python_env"]]
    os.kill(server.process.pid, signal.SIGKILL)  # no drain, no cleanup: tritonserver dies with it (PDEATHSIG)
    server.process.wait()
    deadline = time.monotonic() + 30
    while leftovers.shm_regions_in_use() & {r.name for r in regions} and time.monotonic() < deadline:
        time.sleep(0.5)  # its stubs notice their parent is gone and exit
    left = [r for r in regions if r.exists()]
    assert left and all(p.is_dir() for p in envs) and run_dir.is_dir()
    for r in left:  # older than the grace a start gives a region that is being created
        os.utime(r, (time.time() - 3600,) * 2)
    again = start_server(tmp_path / "next")
    try:
        assert not [r for r in regions if r.exists()]
        assert not [p for p in envs if p.exists()] and not run_dir.exists()
        assert not marked_folders_of(identity)
        line = next(line for line in again.log().splitlines() if "left by runs that are gone" in line)
        removed = int(re.search(r"gone: (\d+) Python-backend", line).group(1))
        assert removed >= len(left), line
        print(line)
    finally:
        stop_server(again)
