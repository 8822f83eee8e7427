#!/usr/bin/env python3
"""Kill a Python backend stub of each model with SIGKILL under load, and measure how long the service takes to
serve again (serve.py's watchdog restarts the model; docs/reliability.md).

    # against a running server (same machine: the stubs are found among tritonserver's children)
    .venv/bin/python fundus_hemorrhage_perf/kill_stub.py --url 127.0.0.1:8001
    # or start serve.py itself on free ports
    .venv/bin/python fundus_hemorrhage_perf/kill_stub.py --models preprocess,unet,postprocess --clients 2 --json out.json

For each model in turn: wait until requests succeed, SIGKILL one of its stub processes, then wait until every
request started from some moment on succeeds (at least --settle-requests of them over --settle seconds).
Recovery time = that moment - the kill. Exit code 1 if a model did not recover within --recovery-timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient

from fundus_hemorrhage_perf.common import ENSEMBLE, image_tensor, load_photos
from fundus_hemorrhage_ops.local_server import local_triton

MODELS = ("preprocess", "unet", "postprocess")


@dataclass
class Record:
    start: float
    end: float
    ok: bool
    error: str = ""


class Load:
    """Clients sending requests back to back over gRPC, each outcome recorded."""

    def __init__(self, grpc_url: str, photos: list[bytes], clients: int = 2, batch: int = 1,
                 timeout_s: float = 120.0):
        self.grpc_url, self.photos, self.batch, self.timeout_s = grpc_url, photos, batch, timeout_s
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(self.timeout_s + 10)

    def _client(self, offset: int) -> None:
        client = grpcclient.InferenceServerClient(self.grpc_url)
        i = offset
        while not self.stop_event.is_set():
            batch = [self.photos[(i + k) % len(self.photos)] for k in range(self.batch)]
            i += self.batch
            start = time.monotonic()
            try:
                image = grpcclient.InferInput("IMAGE", [len(batch), 1], "BYTES")
                image.set_data_from_numpy(image_tensor(batch))
                result = client.infer(ENSEMBLE, [image], client_timeout=self.timeout_s)
                reports = [json.loads(r) for r in result.as_numpy("LESIONS").reshape(-1)]
                bad = [r for r in reports if r.get("status") != "ok"]
                record = Record(start, time.monotonic(), not bad, bad[0].get("error", "") if bad else "")
            except Exception as exc:  # every failure is data here
                record = Record(start, time.monotonic(), False, f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.05)  # no hot loop while the server refuses
            with self.lock:
                self.records.append(record)

    def since(self, t: float) -> list[Record]:
        with self.lock:
            return [r for r in self.records if r.start >= t]


def stubs_of(triton_pid: int, model: str) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(triton_pid).children():
        try:
            cmdline = child.cmdline()
            if (len(cmdline) > 1 and cmdline[0].endswith("triton_python_backend_stub")
                    and Path(cmdline[1]).parent.parent.name == model and child.status() != psutil.STATUS_ZOMBIE):
                out.append(child)
        except psutil.Error:
            continue
    return out


def wait_serving(load: Load, timeout: float, successes: int = 2) -> bool:
    """True once `successes` requests in a row started after now have succeeded."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        done = sorted(load.since(t0), key=lambda r: r.start)
        if len(done) >= successes and all(r.ok for r in done[-successes:]):
            return True
        time.sleep(0.2)
    return False


def kill_and_measure(load: Load, triton_pid: int, model: str, recovery_timeout: float = 60.0,
                     settle: float = 5.0, settle_requests: int = 4) -> dict:
    if not wait_serving(load, recovery_timeout):
        return {"model": model, "recovered": False, "error": "not serving before the kill"}
    stubs = stubs_of(triton_pid, model)
    if not stubs:
        return {"model": model, "recovered": False, "error": "no stub process found"}
    victim = stubs[0]
    t_kill = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    result = {"model": model, "killed_pid": victim.pid, "recovered": False}
    while time.monotonic() - t_kill < recovery_timeout + settle:
        time.sleep(0.2)
        done = sorted(load.since(t_kill), key=lambda r: r.start)
        failures = [r for r in done if not r.ok]
        streak = [r for r in done if not failures or r.start > failures[-1].start]
        # the streak counts once its first request began within the recovery window
        if (len(streak) >= settle_requests and time.monotonic() - streak[0].start >= settle
                and streak[0].start - t_kill <= recovery_timeout):
            result.update(recovered=True, recovery_s=round(streak[0].start - t_kill if failures else 0.0, 2),
                          first_ok_after_last_failure_s=round(streak[0].end - t_kill, 2),
                          failed_requests=len(failures), ok_requests_after=len(streak),
                          error_sample=failures[0].error if failures else "")
            return result
    done = load.since(t_kill)
    failures = [r for r in done if not r.ok]
    result.update(failed_requests=len(failures), error_sample=failures[-1].error if failures else "",
                  error=f"no stable service within {recovery_timeout:.0f} s")
    return result


def run(grpc_url: str, triton_pid: int, photos: list[bytes], models=MODELS, clients: int = 2, batch: int = 1,
        recovery_timeout: float = 60.0, settle: float = 5.0, pause: float = 1.0) -> list[dict]:
    results = []
    with Load(grpc_url, photos, clients, batch) as load:
        for model in models:
            results.append(kill_and_measure(load, triton_pid, model, recovery_timeout, settle))
            time.sleep(pause)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| model | killed pid | recovered | recovery (s) | failed requests | ok requests after | first error |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r.get('killed_pid', '')} | {'yes' if r['recovered'] else 'NO'} | "
                     f"{r.get('recovery_s', '-')} | {r.get('failed_requests', '-')} | {r.get('ok_requests_after', '-')} | "
                     f"{(r.get('error_sample') or r.get('error') or '').replace('|', '/')[:120]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="gRPC host:port of a running server on this machine (default: start serve.py)")
    p.add_argument("--models", default=",".join(MODELS), help="models whose stub is killed, in turn")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="photos per request")
    p.add_argument("--photos", help="folder of photos (default: the IDRiD set if present, else samples/)")
    p.add_argument("--photo-glob", default="*.jpg")
    p.add_argument("--recovery-timeout", type=float, default=60.0)
    p.add_argument("--settle", type=float, default=5.0, help="seconds of uninterrupted success that count as served")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    photos = [data for _, data in load_photos(args.photos, args.photo_glob)]
    with local_triton(args.url, "kill_stub") as (grpc_url, triton_pid):
        results = run(grpc_url, triton_pid, photos, [m for m in args.models.split(",") if m], args.clients,
                      args.batch, args.recovery_timeout, args.settle)
    print(markdown(results))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["recovered"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
