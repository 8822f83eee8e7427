#!/usr/bin/env python3
"""Two serve.py replicas behind HAProxy under a bounded load: SIGTERM one (a drain: no request may fail),
restart it, then SIGKILL the other (only requests in flight on it may fail) and measure how long HAProxy
keeps it in rotation.

    .venv/bin/python fundus_hemorrhage_perf/haproxy/failover.py [--clients 2] [--photos 2] [--output fundus_hemorrhage_perf/results/haproxy-failover]

Needs `haproxy` (Debian package) on PATH. Everything listens on 127.0.0.1, on free ports. Each replica runs a
copy of the model repository with one instance per step, to fit two replicas on two cores. Writes
OUTPUT.json (figures and every request) and OUTPUT.md (summary).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from string import Template

import numpy as np
import psutil
import tritonclient.http as httpclient

from fundus_hemorrhage.model_config import read_config, write_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("haproxy.cfg.template")
ENSEMBLE = "hemorrhage_segmentation"
BUFSIZE = 4 * 2**20  # requests up to 4 MiB can be replayed (a 2-photo request of the samples is ~0.7 MB)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_repository(target: Path) -> Path:
    """The model repository with one instance per Python step and one ONNX Runtime thread (configs read and
    written as protobuf)."""
    shutil.copytree(REPO_ROOT / "model_repository", target)
    for config_path in target.glob("*/config.pbtxt"):
        config = read_config(config_path)
        for group in config.instance_group:
            group.count = 1
        if "intra_op_threads" in config.parameters:
            config.parameters["intra_op_threads"].string_value = "1"
        write_config(config_path, config)
    return target


class Replica:
    def __init__(self, name: str, repository: Path, log_dir: Path):
        self.name, self.repository, self.log_dir = name, repository, log_dir
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 300) -> None:
        self.starts += 1
        log_path = self.log_dir / f"replica-{self.name}-{self.starts}.log"
        log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "serve.py"), "--host", "127.0.0.1", "--http-port", str(self.http_port),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
             "--model-repository", str(self.repository), "--poll-interval", "0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while "Triton is ready" not in log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.name} did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def crash(self) -> float:
        """SIGKILL serve.py, Triton and the Python stubs at once, as when a container dies; the kill's time."""
        regions = shm_regions(self.process.pid)
        # tritonserver and HAProxy run in sessions of their own (serve.py's Ctrl-C handling): a container's death
        # takes the whole tree, so kill every descendant, not only serve.py's process group (a stub that was
        # starting outlived its tritonserver otherwise).
        try:
            tree = [self.process.pid, *(p.pid for p in psutil.Process(self.process.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            raise ProcessLookupError(self.process.pid) from None
        killed = time.monotonic()
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        for region in regions:  # what the pod's /dev/shm volume would take with it
            Path("/dev/shm", region).unlink(missing_ok=True)
        return killed

    def stop(self) -> None:
        if self.process:
            try:
                self.crash()
            except ProcessLookupError:
                pass


def shm_regions(session: int) -> list[str]:
    """The shared-memory regions of the Python stubs in a process session (named on their command lines)."""
    regions = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(proc.name)) == session:
                regions += re.findall(r"triton_python_backend_shm_region_[0-9a-f-]+",
                                      (proc / "cmdline").read_bytes().decode(errors="replace"))
        except (OSError, ValueError):
            continue
    return regions


class HAProxy:
    def __init__(self, work: Path, port_a: int, port_b: int, retry_on: str):
        self.socket_path = work / "haproxy.sock"
        self.port = free_port()
        config = Template(TEMPLATE.read_text()).substitute(
            BUFSIZE=BUFSIZE, RETRY_ON=retry_on, STATS_SOCKET=self.socket_path, FRONTEND_PORT=self.port,
            PORT_A=port_a, PORT_B=port_b)
        (work / "haproxy.cfg").write_text(config)
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.log = (work / "haproxy.log").open("w")
        self.process = subprocess.Popen([binary, "-db", "-f", str(work / "haproxy.cfg")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start:\n{(work / 'haproxy.log').read_text()}")
            time.sleep(0.05)

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers, by name."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r["pxname"] == "triton" and r["svname"] not in ("BACKEND",)}

    def wait_status(self, server: str, prefix: str, timeout: float, since: float | None = None) -> float:
        """Seconds from `since` (default: now) until `server`'s status starts with `prefix` (polled every 20 ms)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.stats()[server]["status"].startswith(prefix):
                return time.monotonic() - (since or start)
            time.sleep(0.02)
        raise RuntimeError(f"HAProxy: server {server} not {prefix} after {timeout} s: {self.stats()[server]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class Load:
    """`clients` threads, each sending one request of `photos` photos at a time through HAProxy, until stopped."""

    def __init__(self, port: int, clients: int, photos: list[bytes]):
        image = httpclient.InferInput("IMAGE", [len(photos), 1], "BYTES")
        image.set_data_from_numpy(np.array(photos, dtype=np.object_).reshape(-1, 1))
        self.body, json_size = httpclient.InferenceServerClient.generate_request_body(
            [image], outputs=[httpclient.InferRequestedOutput("LESIONS")])
        self.headers = {"Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(json_size)}
        self.port, self.photos = port, len(photos)
        self.records: list[dict] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def one(self) -> dict:
        record = {"start": time.monotonic()}
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.request("POST", f"/v2/models/{ENSEMBLE}/infer", self.body, self.headers)
            response = conn.getresponse()
            body = response.read()
            record.update(status=response.status, server=response.getheader("X-Served-By"))
            if response.status == 200:
                length = response.getheader("Inference-Header-Content-Length")
                result = httpclient.InferenceServerClient.parse_response_body(
                    body, header_length=int(length) if length else None)
                reports = [json.loads(r[0]) for r in result.as_numpy("LESIONS")]
                record["ok"] = len(reports) == self.photos and all(r["status"] == "ok" for r in reports)
            else:
                record.update(ok=False, error=body[:300].decode(errors="replace"))
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            record.update(ok=False, error=repr(exc)[:300])
        record["end"] = time.monotonic()
        return record

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.records.append(self.one())

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(180)


def experiment(args: argparse.Namespace, work: Path) -> dict:
    repository = small_repository(work / "model_repository")
    a, b = Replica("a", repository, work), Replica("b", repository, work)
    haproxy = None
    load = None
    try:
        for replica in (a, b):
            replica.start()
        haproxy = HAProxy(work, a.http_port, b.http_port, args.retry_on)
        for name in ("a", "b"):
            haproxy.wait_status(name, "UP", 30)
        samples = sorted((REPO_ROOT / "samples").glob("IDRiD_*[0-9].jpg"))
        photos = [samples[i % len(samples)].read_bytes() for i in range(args.photos)]
        load = Load(haproxy.port, args.clients, photos)
        t0 = time.monotonic()
        load.start()
        time.sleep(args.settle)

        # 1. SIGTERM a: it drains; HAProxy must replay whatever it refuses (503) or drops.
        snapshots = {"before_sigterm": haproxy.stats()}
        t_term = time.monotonic()
        a.process.send_signal(signal.SIGTERM)
        term_down_s = haproxy.wait_status("a", "DOWN", 60, since=t_term)
        a_code = a.process.wait(120)
        a_exit_s = time.monotonic() - t_term
        time.sleep(args.settle)

        # 2. Restart a; once HAProxy has it back and it has served, SIGKILL b.
        snapshots["before_restart"] = haproxy.stats()
        t_restart = time.monotonic()
        a.start()
        haproxy.wait_status("a", "UP", 60)
        a_back_s = time.monotonic() - t_restart
        deadline = time.monotonic() + 60
        while not any(r.get("server") == "a" and r["start"] > t_restart for r in list(load.records)):
            if time.monotonic() > deadline:
                raise RuntimeError("the restarted replica got no request")
            time.sleep(0.1)
        time.sleep(args.settle / 2)
        snapshots["before_sigkill"] = haproxy.stats()
        t_kill = b.crash()
        kill_down_s = haproxy.wait_status("b", "DOWN", 60, since=t_kill)
        time.sleep(args.settle)
        load.stop()
        snapshots["end"] = haproxy.stats()
    finally:
        if load:
            load.stop_event.set()
        if haproxy:
            haproxy.stop()
        for replica in (a, b):
            replica.stop()

    records = [{**r, "start": round(r["start"] - t0, 3), "end": round(r["end"] - t0, 3)} for r in load.records]
    term, kill = t_term - t0, t_kill - t0

    def phase(lo: float, hi: float) -> list[dict]:
        return [r for r in records if lo <= r["end"] < hi]

    term_phase = phase(term, t_restart - t0)
    kill_phase = phase(kill, float("inf"))
    kill_failed = [r for r in kill_phase if not r["ok"]]
    in_flight_at_kill = [r for r in records if r["start"] < kill < r["end"]]

    def delta(server: str, lo: str, hi: str) -> dict[str, int]:
        """HAProxy's per-server counters over a phase: 5xx answers, connection/response errors, retries."""
        return {k: int(snapshots[hi][server][k] or 0) - int(snapshots[lo][server][k] or 0)
                for k in ("stot", "hrsp_5xx", "econ", "eresp", "wretr", "wredis")}
    return {
        "setup": {"clients": args.clients, "photos_per_request": args.photos, "instances_per_step": 1,
                  "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
                  "health_check": "GET /v2/health/ready every 0.5 s, fall 2, rise 2; observe layer4",
                  "retry_on": f"{args.retry_on}, retries 2, redispatch 1",
                  "tune_bufsize": BUFSIZE},
        "requests": {"total": len(records), "ok": sum(r["ok"] for r in records),
                     "failed": sum(not r["ok"] for r in records)},
        "sigterm": {"at_s": round(term, 3), "requests_completed_during_drain": len(term_phase),
                    "failed": sum(not r["ok"] for r in term_phase),
                    "haproxy_marked_down_after_s": round(term_down_s, 3),
                    "replica_exit_code": a_code, "replica_exited_after_s": round(a_exit_s, 3),
                    "restarted_replica_up_in_haproxy_after_s": round(a_back_s, 3),
                    "drained_replica_counters": delta("a", "before_sigterm", "before_restart")},
        "sigkill": {"at_s": round(kill, 3), "requests_completed_after": len(kill_phase),
                    "failed": len(kill_failed),
                    "failed_not_in_flight_at_kill": sum(r not in in_flight_at_kill for r in kill_failed),
                    "in_flight_at_kill": len(in_flight_at_kill),
                    "killed_replica_counters": delta("b", "before_sigkill", "end"),
                    "haproxy_marked_down_after_s": round(kill_down_s, 3),
                    "served_by_killed_after_kill": sum(r.get("server") == "b" and r["start"] > kill
                                                       for r in records)},
        "records": records,
    }


def markdown(result: dict) -> str:
    s, k, r = result["sigterm"], result["sigkill"], result["requests"]
    return "\n".join([
        "# Two replicas behind HAProxy: drain and crash", "",
        f"Setup: {result['setup']['clients']} clients, {result['setup']['photos_per_request']} photos per HTTP "
        f"request, {result['setup']['haproxy']}; health check {result['setup']['health_check']}; "
        f"retry-on {result['setup']['retry_on']}.", "",
        "| | figure |", "|---|---|",
        f"| requests | {r['total']} ({r['ok']} ok, {r['failed']} failed) |",
        f"| SIGTERM: requests completed during the drain | {s['requests_completed_during_drain']}, "
        f"{s['failed']} failed |",
        f"| SIGTERM: HAProxy marked the replica down after | {s['haproxy_marked_down_after_s']} s |",
        f"| SIGTERM: replica exited after (code) | {s['replica_exited_after_s']} s ({s['replica_exit_code']}) |",
        f"| restart: back in rotation after | {s['restarted_replica_up_in_haproxy_after_s']} s |",
        f"| SIGKILL: requests in flight at the kill (both replicas) | {k['in_flight_at_kill']} |",
        f"| SIGKILL: failed requests (not in flight at the kill) | {k['failed']} ({k['failed_not_in_flight_at_kill']}) |",
        f"| SIGKILL: HAProxy marked the replica down after | {k['haproxy_marked_down_after_s']} s |",
        f"| SIGKILL: requests served by the killed replica after the kill | {k['served_by_killed_after_kill']} |",
        "", "HAProxy's counters for the stopped replica over each phase (`show stat`: sessions, 5xx answers, "
        "connection and response errors, retries, redispatches to the other replica):", "",
        f"- drained (SIGTERM to restart): `{json.dumps(s['drained_replica_counters'])}`",
        f"- killed (SIGKILL to end): `{json.dumps(k['killed_replica_counters'])}`", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--photos", type=int, default=2)
    p.add_argument("--retry-on", default="conn-failure empty-response 503",
                   help="HAProxy retry-on: without empty-response, requests in flight on a killed replica fail")
    p.add_argument("--settle", type=float, default=6.0, help="seconds of load before and after each event")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "fundus_hemorrhage_perf" / "results" / "haproxy-failover",
                   help="writes OUTPUT.json and OUTPUT.md")
    args = p.parse_args(argv)
    if not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        sys.exit("failover.py: haproxy is not installed (apt-get install haproxy)")
    with tempfile.TemporaryDirectory(prefix="haproxy-failover-") as tmp:
        try:
            result = experiment(args, Path(tmp))
        except Exception:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-1500:]}", file=sys.stderr)
            raise
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
