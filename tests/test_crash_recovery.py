"""Crashes and signals through the real serve.py (issue 12): repeated stub crashes, a tritonserver crash, Ctrl-C
to the process group, SIGKILL of serve.py, and a version folder copied in slowly.

One server (a copy of the repository, polled every second) serves the slow copy and the stub crashes; the
signal tests start their own. Slow: several minutes on two busy cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from fundus_hemorrhage_ops.engines.identity import read_identity, write_with_identity
from fundus_hemorrhage_ops.serving.process import zombie_children
from fundus_hemorrhage_ops.serving.watchdog import python_stubs
from fundus_hemorrhage_perf import kill_stub
from tests.conftest import ENSEMBLE, REPO_ROOT, SAMPLE_PHOTOS, start_server, stop_server
from tests.conftest import infer as request_ensemble

pytestmark = pytest.mark.slow
RECOVERY_S = 60.0


def small_photo() -> bytes:
    import cv2

    from tests.fundus import encode
    img = cv2.imread(str(SAMPLE_PHOTOS[0]), cv2.IMREAD_COLOR)
    return encode(cv2.resize(img, (1072, 712), interpolation=cv2.INTER_AREA))


def tritonserver_of(server) -> psutil.Process | None:
    return next((p for p in psutil.Process(server.process.pid).children() if p.name() == "tritonserver"), None)


def readiness(server) -> int | str:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return type(exc).__name__


def wait_for(predicate, timeout: float, what: str, server) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{server.log()[-4000:]}")


class ReadinessPoller(threading.Thread):
    """/v2/health/ready every 50 ms: (monotonic time, status)."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.samples, self.done = server, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), readiness(self.server)))
            time.sleep(0.05)

    def between(self, start: float, end: float) -> list:
        return [s for t, s in self.samples if start <= t <= end]


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    repo = tmp / "repo"
    shutil.copytree(REPO_ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    server = start_server(tmp, repo, extra_args=("--poll-interval", "1"))
    yield server, repo
    stop_server(server)


def test_a_version_folder_copied_in_slowly_waits_for_its_files(repo_server):
    server, repo = repo_server
    unet = repo / "unet"
    served = max(int(d.name) for d in unet.iterdir() if d.name.isdigit())
    new = served + 1
    folder = unet / str(new)
    folder.mkdir()
    for name in sorted(p.name for p in (unet / str(served)).iterdir() if p.is_file() and p.name != "model.onnx"):
        shutil.copy2(unet / str(served) / name, folder / name)  # everything but model.onnx, for now
    wait_for(lambda: f"model 'unet' version {new} refused: no model.onnx in the folder" in server.log(), 60,
             "the half-copied version refused", server)
    time.sleep(3)  # several more polls: the same files stay refused, and the served version keeps serving
    assert server.log().count(f"model 'unet' version {new} refused") == 1
    result = request_ensemble(grpcclient.InferenceServerClient(server.grpc_url), "grpc", [small_photo()])
    assert json.loads(result.as_numpy("LESIONS")[0, 0])["model"]["version"] == str(served)
    # The copy completes: its files changed, so it is checked again and served.
    _, threshold = read_identity(unet / str(served) / "model.onnx")
    staging = repo / f"model-{new}.onnx"
    write_with_identity(unet / str(served) / "model.onnx", staging, new, threshold)
    os.replace(staging, folder / "model.onnx")

    def serves_new() -> bool:
        try:
            result = request_ensemble(grpcclient.InferenceServerClient(server.grpc_url), "grpc", [small_photo()])
        except Exception:
            return False
        return json.loads(result.as_numpy("LESIONS")[0, 0])["model"]["version"] == str(new)
    wait_for(serves_new, 120, f"version {new} served", server)


def test_repeated_stub_crashes_recover_without_zombies_or_leaked_memory(repo_server):
    server, _ = repo_server
    poller = ReadinessPoller(server)
    poller.start()
    rounds = []
    seen_regions: set[str] = set()  # /dev/shm is shared with other servers on this machine: only ours count
    with kill_stub.Load(server.grpc_url, [small_photo()], clients=2) as load:
        for round_ in range(3):
            assert kill_stub.wait_serving(load, RECOVERY_S), server.log()[-3000:]
            triton = tritonserver_of(server)
            stubs = kill_stub.stubs_of(triton.pid, "preprocess")
            victim = max(stubs, key=lambda p: p.create_time())  # a stub of the newest generation
            seen_regions.update(s.shm_region for s in python_stubs(triton.pid))
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            served = kill_stub.wait_serving(load, RECOVERY_S, successes=3)
            serving_after = time.monotonic() - killed_at
            assert served, (round_, server.log()[-4000:])
            # Then everything is released: no zombie, no stub of a replaced generation, no stray shared memory.
            def clean() -> bool:
                now = tritonserver_of(server)
                if now is None or readiness(server) != 200:
                    return False
                live = python_stubs(now.pid)
                leaked = (seen_regions - {s.shm_region for s in live}) & set(os.listdir("/dev/shm"))
                per_instance = {}
                for stub in live:
                    per_instance.setdefault(stub.key, []).append(stub)
                return not zombie_children(now.pid) and all(len(v) == 1 for v in per_instance.values()) and not leaked
            clean_after = wait_for(clean, 120, f"round {round_}: everything released", server) + serving_after
            after = [(t - killed_at, s) for t, s in poller.samples if killed_at <= t <= killed_at + clean_after]
            down = [t for t, s in after if s != 200]
            rounds.append({"round": round_, "killed": victim.pid, "serving_again_s": round(serving_after, 1),
                           "clean_s": round(clean_after, 1),
                           "not_ready_from_s": round(down[0], 1) if down else None,
                           "not_ready_s": round(len(down) * 0.05, 1),
                           "answers": sorted(set(map(str, (s for _, s in after))))})
            assert serving_after < RECOVERY_S, rounds
            assert kill_stub.wait_serving(load, RECOVERY_S), server.log()[-3000:]
    poller.done.set()
    log = server.log()
    print(json.dumps(rounds), "\n".join(line for line in log.splitlines() if line.startswith("serve.py")), sep="\n")
    for r in rounds:
        # Readiness drops once the watchdog sees the death (one --watchdog-interval, 2 s).
        assert r["not_ready_from_s"] is not None and r["not_ready_from_s"] < 5.0, ("readiness stayed 200", rounds)
    assert log.count("watchdog: model 'preprocess': the stub process of instance") >= 3, log[-4000:]


def test_a_crashed_tritonserver_is_restarted(tmp_path):
    server = start_server(tmp_path, extra_args=("--poll-interval", "0"))
    try:
        first = tritonserver_of(server)
        first.send_signal(signal.SIGABRT)  # what the 2 GiB gzip body did to Triton 2.51 before the guard
        killed = time.monotonic()
        wait_for(lambda: readiness(server) != 200, 10, "readiness down", server)
        took = wait_for(lambda: (tritonserver_of(server) is not None and tritonserver_of(server).pid != first.pid
                                 and readiness(server) == 200), RECOVERY_S, "a new tritonserver", server)
        client = httpclient.InferenceServerClient(server.http_url)
        result = request_ensemble(client, "http", [small_photo()], outputs=("LESIONS",))
        assert json.loads(result.as_numpy("LESIONS")[0, 0])["status"] == "ok"
        assert server.process.poll() is None
        log = server.log()
        assert "ended unexpectedly (signal 6 (SIGABRT))" in log, log[-3000:]
        print(f"tritonserver restarted and ready {time.monotonic() - killed:.1f} s after SIGABRT ({took:.1f} s)")
    finally:
        assert stop_server(server) == 0


def test_ctrl_c_to_the_process_group_drains_and_exits_zero(tmp_path):
    server = start_server(tmp_path, extra_args=("--poll-interval", "0"))
    photos = [p.read_bytes() for p in SAMPLE_PHOTOS]
    batch = [photos[i % len(photos)] for i in range(8)]
    outcomes: list = [None] * 3

    def send(i: int) -> None:
        try:
            if i == 0:
                client = httpclient.InferenceServerClient(server.http_url, network_timeout=600,
                                                          connection_timeout=600)
                result = request_ensemble(client, "http", batch, outputs=("LESIONS",))
            else:
                result = request_ensemble(grpcclient.InferenceServerClient(server.grpc_url), "grpc", batch,
                                          outputs=("LESIONS",))
            outcomes[i] = [json.loads(r)["status"] for r in result.as_numpy("LESIONS").reshape(-1)]
        except Exception as exc:  # reported by the assertion
            outcomes[i] = repr(exc)[:500]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.7)  # all three are in flight: three 8-photo requests take seconds even on a quiet machine
        assert all(t.is_alive() for t in threads), outcomes
        os.killpg(os.getpgid(server.process.pid), signal.SIGINT)  # a terminal's Ctrl-C
        code = server.process.wait(300)
        for t in threads:
            t.join(300)
    finally:
        stop_server(server)
    assert outcomes == [["ok"] * 8] * 3, (outcomes, server.log()[-3000:])
    assert code == 0, server.log()[-3000:]


def test_no_orphan_when_serve_py_is_killed(tmp_path):
    server = start_server(tmp_path, extra_args=("--poll-interval", "0", "--watchdog-interval", "0"))
    children = [p for p in psutil.Process(server.process.pid).children() if p.name() in ("tritonserver", "haproxy")]
    assert {p.name() for p in children} == {"tritonserver", "haproxy"}
    stubs = [p for t in children if t.name() == "tritonserver" for p in t.children()]
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)
    gone, alive = psutil.wait_procs(children + stubs, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
