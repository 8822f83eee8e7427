"""What a Service or load balancer relies on at a pod's stop: after SIGTERM, serve.py stops reporting ready at
once and for good, while the request in flight completes and the process exits 0.

The server is started through its command line only. Readiness is polled every 5 ms, not every 0.1 s: the
drain's brief returns to 200 before fundus_hemorrhage_ops.serving.drain.withdraw_readiness (10-250 ms) would
otherwise mostly go unseen.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO_ROOT / "samples").glob("IDRiD_*[0-9].jpg"))
DROP_WITHIN_S = 2.0
GRACE_S = 90  # deploy/kubernetes/base/deployment.yaml terminationGracePeriodSeconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(log_path: Path) -> tuple[subprocess.Popen, int]:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "serve.py"), "--host", "127.0.0.1", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--poll-interval", "0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    deadline = time.monotonic() + 300
    while "Triton is ready" not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"serve.py did not become ready:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return process, http_port


def poll_readiness(port: int, stop: threading.Event, samples: list[tuple[float, object]]) -> None:
    """(monotonic time, HTTP status or the connection error's name), every 5 ms over a kept-alive connection."""
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/v2/health/ready")
            response = conn.getresponse()
            response.read()
            samples.append((time.monotonic(), response.status))
        except OSError as exc:  # refused once Triton has stopped
            samples.append((time.monotonic(), type(exc).__name__))
            conn = None
        time.sleep(0.005)


def test_readiness_drops_at_sigterm_while_a_request_completes(tmp_path):
    process, port = start_serve(tmp_path / "serve.log")
    try:
        photos = [PHOTOS[i % len(PHOTOS)].read_bytes() for i in range(10)]
        outcome: dict[str, object] = {}

        def send():
            client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300,
                                                      connection_timeout=300)
            image = httpclient.InferInput("IMAGE", [len(photos), 1], "BYTES")
            image.set_data_from_numpy(np.array(photos, dtype=np.object_).reshape(-1, 1))
            try:
                result = client.infer("hemorrhage_segmentation", [image],
                                      outputs=[httpclient.InferRequestedOutput("LESIONS")])
                outcome["reports"] = [json.loads(r[0]) for r in result.as_numpy("LESIONS")]
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = repr(exc)
            outcome["done"] = time.monotonic()

        request = threading.Thread(target=send)
        request.start()
        time.sleep(1.0)  # the 10 photos are sent and being processed
        assert request.is_alive(), "the request finished before SIGTERM: nothing was in flight"

        samples: list[tuple[float, object]] = []
        stop = threading.Event()
        poller = threading.Thread(target=poll_readiness, args=(port, stop, samples))
        poller.start()
        time.sleep(0.05)
        sigterm = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(GRACE_S)
        exited = time.monotonic()
        stop.set()
        poller.join(5)
        request.join(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "serve.log").read_text()[-3000:]
    after = [(round(t - sigterm, 3), s) for t, s in samples if t >= sigterm]
    changes = after[:1] + [b for a, b in zip(after, after[1:]) if a[1] != b[1]]
    print("readiness after SIGTERM (s, answer):", changes, "| request done at",
          round(outcome.get("done", sigterm) - sigterm, 2), "| exit at", round(exited - sigterm, 2))

    assert outcome.get("reports") and len(outcome["reports"]) == 10, f"{outcome.get('error')}\n{log}"
    assert all(r["status"] == "ok" for r in outcome["reports"])
    assert code == 0, log
    assert exited - sigterm < GRACE_S

    before = [s for t, s in samples if t < sigterm]
    assert before and set(before) == {200}, "not ready before SIGTERM"
    first_not_ready = next((t for t, s in after if s != 200), None)
    assert first_not_ready is not None and first_not_ready <= DROP_WITHIN_S, after[:20]
    back_to_ready = [t for t, s in after if s == 200 and t > first_not_ready]
    assert not back_to_ready, f"ready again after the drop, at +{back_to_ready[:10]} s (drop at +{first_not_ready} s)"
