"""Reliability round 3 (issue 23, docs/reliability.md section 8), through the real server where the behaviour is the
server's: cancelled and timed-out requests, the HTTP admission bound (busy answers), slow clients through HAProxy,
photos with huge metadata (PNG text/ICC chunks, a zTXt bomb, many 64 KB JPEG APP segments) and files with several
frames. The minutes-long cases are marked slow."""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.request
import zlib

import cv2
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from fundus_hemorrhage.client import image_input
from fundus_hemorrhage.preprocessing import Preprocessed, PreprocessConfig
from fundus_hemorrhage.steps import read_photo
from fundus_hemorrhage_ops.serving import proxy
from tests.conftest import ENSEMBLE, REPO_ROOT, SAMPLE_PHOTOS, make_client
from tests.conftest import infer as request_ensemble
from tests.fundus import encode

# ------------------------------------------------------------------------------------------------ photos


def _small_bgr():
    img = cv2.imread(str(SAMPLE_PHOTOS[-1]), cv2.IMREAD_COLOR)
    return cv2.resize(img, (1072, 712), interpolation=cv2.INTER_AREA)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with(*chunks: bytes) -> bytes:
    """A real photo as PNG with `chunks` inserted after IHDR (offset 33)."""
    data = encode(_small_bgr(), ".png")
    return data[:33] + b"".join(chunks) + data[33:]


def ztxt(inflated: int) -> bytes:
    return _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * inflated, 9))


def itxt(size: int) -> bytes:
    return _chunk(b"iTXt", b"Comment\x00\x00\x00\x00\x00" + b"a" * size)


def iccp(inflated: int) -> bytes:
    return _chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * inflated, 9))


def jpeg_with_app(segments: int, marker: int = 0xE1) -> bytes:
    """A real photo as JPEG with `segments` APPn segments of 64 KB each right after SOI."""
    data = encode(_small_bgr(), ".jpg")
    seg = bytes([0xFF, marker]) + struct.pack(">H", 65533) + b"\x00" * 65531
    return data[:2] + seg * segments + data[2:]


def frames(fmt: str, n: int, first_blank: bool = False) -> bytes:
    rgb = Image.fromarray(cv2.cvtColor(_small_bgr(), cv2.COLOR_BGR2RGB))
    grey = Image.new("RGB", rgb.size, (90, 90, 90))
    pages = [grey, rgb] if first_blank else [rgb] + [grey] * (n - 1)
    buf = io.BytesIO()
    pages[0].save(buf, fmt, save_all=True, append_images=pages[1:], **({"duration": 100} if fmt == "PNG" else {}))
    return buf.getvalue()


METADATA_REFUSED = "PNG metadata too large: a compressed text or ICC-profile chunk (zTXt, iTXt or iCCP) inflates past"


def test_huge_metadata_is_read_or_refused_fast_with_its_reason():
    """A zTXt bomb (1.7 MB -> 1 GiB) is refused in milliseconds without inflating it; big uncompressed text and
    tens of MB of APP segments are served."""
    config = PreprocessConfig()
    cases = {"zTXt bomb": (png_with(ztxt(2**30)), METADATA_REFUSED),
             "iCCP 10 MB": (png_with(iccp(10 * 2**20)), METADATA_REFUSED),
             "200 zTXt": (png_with(*[ztxt(600_000)] * 200), METADATA_REFUSED),
             "iTXt 4 MB": (png_with(itxt(4 * 2**20)), None),
             "400 APP1": (jpeg_with_app(400), None),
             "100 APP15": (jpeg_with_app(100, 0xEF), None)}
    for name, (data, refused) in cases.items():
        start = time.monotonic()
        result = read_photo(data, config)
        took = time.monotonic() - start
        if refused:
            assert isinstance(result, str) and result.startswith(refused), (name, result)
            assert took < 1.0, (name, took)
        else:
            assert isinstance(result, Preprocessed) and result.quality.gradable, (name, result)
            assert took < 5.0, (name, took)


def test_files_with_several_frames_are_refused_saying_how_many():
    config = PreprocessConfig()
    for data, expected in ((frames("TIFF", 2), "TIFF file with 2 pages"),
                           (frames("TIFF", 2, first_blank=True), "TIFF file with 2 pages"),
                           (frames("PNG", 2), "PNG file with 2 frames (an animated PNG)")):
        result = read_photo(data, config)
        assert isinstance(result, str) and result.startswith(expected + ": only single-image files are accepted")
    assert isinstance(read_photo(frames("TIFF", 1), config), Preprocessed)
    many = io.BytesIO()
    Image.new("L", (200, 200)).save(many, "TIFF", save_all=True, append_images=[Image.new("L", (1, 1))] * 300)
    start = time.monotonic()
    assert read_photo(many.getvalue(), config).startswith("TIFF file with more than 100 pages")
    assert time.monotonic() - start < 1.0


def test_server_answers_each_odd_photo_and_the_good_ones_in_the_same_request(triton_server, sample_bytes):
    photos = [sample_bytes[0], png_with(ztxt(2**30)), jpeg_with_app(500), frames("TIFF", 2), png_with(itxt(2**20))]
    client = make_client(triton_server, "grpc")
    result = request_ensemble(client, "grpc", photos, outputs=("LESIONS",))
    reports = [json.loads(r) for r in result.as_numpy("LESIONS").reshape(-1)]
    assert [r["status"] for r in reports] == ["ok", "error", "ok", "error", "ok"]
    assert reports[1]["error"].startswith(METADATA_REFUSED) and reports[1]["image_index"] == 1
    assert reports[3]["error"].startswith("TIFF file with 2 pages") and reports[3]["image_index"] == 3


# ------------------------------------------------------------------------------------------------ cancellation


def _metrics(server) -> dict[tuple[str, str, str], float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out: dict[tuple[str, str, str], float] = {}
    for m in re.finditer(r'^(nv_inference_request_(?:success|failure))\{([^}]*)\} (\S+)', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = (m.group(1), labels.get("model", ""), labels.get("reason", ""))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def _grew(before: dict, after: dict, name: str, model: str, reason: str = "") -> float:
    key = (name, model, reason)
    return after.get(key, 0.0) - before.get(key, 0.0)


def _serves(server) -> bool:
    reports = request_ensemble(make_client(server, "grpc"), "grpc", [SAMPLE_PHOTOS[0].read_bytes()],
                               outputs=("LESIONS",)).as_numpy("LESIONS").reshape(-1)
    return json.loads(reports[0])["status"] == "ok"


def test_a_timed_out_grpc_request_stops_before_the_model(triton_server, sample_bytes):
    """client_timeout 0.3 s on 10 photos: DEADLINE_EXCEEDED at once; preprocess finishes its photos, the core
    refuses the request at unet_router's queue (CANCELED), unet and postprocess never see it."""
    ten = (sample_bytes * 4)[:10]
    client = make_client(triton_server, "grpc")
    before = _metrics(triton_server)
    start = time.monotonic()
    with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
        request_ensemble(client, "grpc", ten, outputs=("LESIONS",), timeout=0.3)
    assert time.monotonic() - start < 1.5
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = _metrics(triton_server)
        if _grew(before, after, "nv_inference_request_failure", "unet_router", "CANCELED") >= 1:
            break
        time.sleep(0.5)
    assert _grew(before, after, "nv_inference_request_failure", "unet_router", "CANCELED") == 1
    assert _grew(before, after, "nv_inference_request_success", "unet") == 0
    assert _grew(before, after, "nv_inference_request_success", "postprocess") == 0
    assert _serves(triton_server)


@pytest.mark.slow
def test_postprocess_skips_a_request_cancelled_while_the_model_ran(triton_server, sample_bytes):
    """Deadlines swept across the request's time until one passes while unet_router runs: postprocess sees
    is_cancelled() and answers CANCELLED without encoding anything (logged); the service keeps serving."""
    ten = (sample_bytes * 4)[:10]
    client = make_client(triton_server, "grpc")
    start = time.monotonic()
    request_ensemble(client, "grpc", ten, outputs=("LESIONS",))
    full = time.monotonic() - start
    seen = triton_server.log().count("postprocess: request cancelled by the client")
    for step in range(40):
        with pytest.raises(InferenceServerException):
            request_ensemble(client, "grpc", ten, outputs=("LESIONS",), timeout=full * (0.45 + step * 0.0125))
        time.sleep(full)
        if triton_server.log().count("postprocess: request cancelled by the client") > seen:
            break
    assert triton_server.log().count("postprocess: request cancelled by the client") > seen
    assert _serves(triton_server)


# ------------------------------------------------------------------------------------------------ HAProxy


def _triton_http_port(server) -> int:
    config = next((REPO_ROOT / ".triton" / "runs" / str(server.process.pid)).glob("haproxy-*.cfg")).read_text()
    return int(re.search(r"server triton 127\.0\.0\.1:(\d+)", config).group(1))


def test_http_admission_bound_answers_busy_at_once(triton_server, sample_bytes, tmp_path):
    """A second HAProxy with the generated configuration, 1 in flight and 1 queued, in front of the session
    server's Triton: of 4 simultaneous 10-photo requests the overflow gets 503 "server busy" within a second, the
    others are served; health is not queued."""
    from tests.conftest import free_ports
    port, = free_ports(1)
    config = tmp_path / "haproxy.cfg"
    config.write_text(proxy.haproxy_config("127.0.0.1", (port, _triton_http_port(triton_server)), 2**30,
                                           admission=proxy.Admission(1, 1, 60)))
    haproxy = subprocess.Popen([proxy.find_haproxy(), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        ten, results = (sample_bytes * 4)[:10], []

        def one() -> None:
            client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)
            start = time.monotonic()
            try:
                request_ensemble(client, "http", ten, outputs=("LESIONS",))
                results.append(("ok", time.monotonic() - start))
            except InferenceServerException as exc:
                results.append((str(exc), time.monotonic() - start))
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status == 200

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
    finally:
        haproxy.terminate()
        haproxy.wait()
    busy = [(text, took) for text, took in results if "server busy" in text]
    assert len(busy) == 2 and all(took < 1.0 for _, took in busy), results
    assert busy[0][0].startswith("[503] server busy: 1 inference requests are in progress and 1 are waiting")
    assert sum(text == "ok" for text, _ in results) == 2, results


def test_generated_configs_with_and_without_the_bound_are_valid(tmp_path):
    lua = tmp_path / "grpc.lua"
    lua.write_text(proxy.grpc_refuse_lua())
    for admission in (proxy.Admission(), proxy.Admission(0, 0)):
        config = tmp_path / "haproxy.cfg"
        config.write_text(proxy.haproxy_config("127.0.0.1", (18000, 18100), 2**30, proxy.GrpcGuard(18001, 18101),
                                               lua, admission=admission))
        check = subprocess.run([proxy.find_haproxy(), "-c", "-q", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert ("maxconn 8" in config.read_text()) == (admission.in_flight > 0)


def _http_head(body_length: int) -> bytes:
    return (f"POST /v2/models/{ENSEMBLE}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: 10\r\nContent-Length: {body_length}\r\n\r\n").encode()


@pytest.mark.slow
def test_slow_clients_do_not_stop_the_others(triton_server, sample_bytes):
    """Slowloris (headers a byte a second): HAProxy answers 408 after `timeout http-request` (60 s). A body sent at
    500 bytes/s and a client that never reads a 10-photo answer stay open (timeout client: 600 s of silence), and
    every photo sent meanwhile over HTTP and gRPC is served within seconds."""
    outcome: dict[str, str] = {}
    head = _http_head(3_000_000)

    def slowloris() -> None:
        with socket.create_connection(("127.0.0.1", triton_server.http_port)) as s:
            s.settimeout(1.0)
            start = time.monotonic()
            for byte in head[:-4]:
                try:
                    s.send(bytes([byte]))
                    answer = s.recv(100)
                    outcome["slowloris"] = f"{answer[:30]!r} after {time.monotonic() - start:.0f} s"
                    return
                except socket.timeout:
                    continue

    def slow_body() -> None:
        with socket.create_connection(("127.0.0.1", triton_server.http_port)) as s:
            s.sendall(head)
            for _ in range(80):
                s.send(b"\x00" * 500)
                time.sleep(1)
            outcome["slow body"] = "open after 80 s"

    threads = [threading.Thread(target=f) for f in (slowloris, slow_body)]
    for t in threads:
        t.start()
    http = make_client(triton_server, "http")
    served = []
    for _ in range(7):
        time.sleep(10)
        start = time.monotonic()
        assert _serves(triton_server)
        request_ensemble(http, "http", sample_bytes[:1], outputs=("LESIONS",))
        served.append(time.monotonic() - start)
    for t in threads:
        t.join()
    assert re.fullmatch(r"b'HTTP/1.1 408 Request Time-out.*' after 6[0-2] s", outcome["slowloris"]), outcome
    assert outcome["slow body"] == "open after 80 s"
    assert max(served) < 30, served


def test_http_client_that_closes_is_not_cancelled_but_the_server_keeps_serving(triton_server, sample_bytes):
    """HTTP has no cancellation in Triton 2.51: a 10-photo request whose client closes right after sending runs to
    the end (the ensemble counts a success), and the next photo is served."""
    inp = image_input("http", (sample_bytes * 4)[:10])
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=[httpclient.InferRequestedOutput("LESIONS", binary_data=True)])
    head = _http_head(len(body)).replace(b"Inference-Header-Content-Length: 10",
                                         f"Inference-Header-Content-Length: {json_size}".encode())
    before = _metrics(triton_server)
    with socket.create_connection(("127.0.0.1", triton_server.http_port)) as s:
        s.sendall(head + body)
        time.sleep(0.3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        after = _metrics(triton_server)
        if _grew(before, after, "nv_inference_request_success", "postprocess") >= 1:
            break
        time.sleep(0.5)
    assert _grew(before, after, "nv_inference_request_success", ENSEMBLE) == 1
    assert _serves(triton_server)

