"""Reliability through the real server: the bad-input matrix of docs/reliability.md, protocol errors, a killed
stub, SIGTERM under load, model updates (bad and good), and the secure defaults (admin key, TLS, request limit).

The bad inputs share the session server (few requests, many kinds each); the fault tests start their own."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from fundus_hemorrhage_ops.engines.identity import read_identity, write_with_identity
from fundus_hemorrhage_perf import kill_stub
from tests.conftest import ENSEMBLE, REPO_ROOT, SAMPLE_PHOTOS, make_client, start_server, stop_server
from tests.conftest import infer as request_ensemble
from tests.fundus import encode, synthetic_fundus

MAX_BYTES = 64 * 2**20  # preprocess max_bytes (config.pbtxt)


# ------------------------------------------------------------------------------------------------ helpers

def infer(client, protocol: str, photos: list[bytes]):
    return request_ensemble(client, protocol, photos, outputs=("MASK", "LESIONS"))


def reports_and_masks(result) -> tuple[list[dict], list[bytes]]:
    return ([json.loads(r) for r in result.as_numpy("LESIONS").reshape(-1)], list(result.as_numpy("MASK").reshape(-1)))


def mask_shape(png: bytes) -> tuple[int, int]:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]


def small_photo() -> bytes:
    """A real photo at a quarter of its size: fast requests for the load generators."""
    img = cv2.imread(str(SAMPLE_PHOTOS[0]), cv2.IMREAD_COLOR)
    return encode(cv2.resize(img, (1072, 712), interpolation=cv2.INTER_AREA))


def png_claiming(width: int, height: int, pixels: bool = True) -> bytes:
    """A PNG whose header claims width x height, with (almost) no pixel data behind it."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return out + (chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"") if pixels else b"")


def jpeg_segments(data: bytes) -> tuple[int, int]:
    """(offset of the SOF0 marker, offset just past the SOS header) of a baseline JPEG."""
    sof, sos = data.find(b"\xff\xc0"), data.find(b"\xff\xda")
    return sof, sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def error_inputs() -> dict[str, tuple[bytes, str]]:
    """Bad photos answered with an error naming the image index and this reason (docs/reliability.md)."""
    fundus, _ = synthetic_fundus(900, 700)
    jpeg = encode(fundus)
    png = encode(fundus, ".png")
    sof, scan = jpeg_segments(jpeg)
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 256, len(jpeg) - scan, dtype=np.uint8).tobytes().replace(b"\xff", b"\x00")
    bomb_jpeg = bytearray(jpeg)
    bomb_jpeg[sof + 5:sof + 9] = struct.pack(">HH", 50000, 50000)
    over_pixels = pil_bytes(Image.new("1", (8000, 8000)), "PNG")  # a complete, valid 64-megapixel PNG of 8 kB
    gif = pil_bytes(Image.fromarray(fundus[..., ::-1]), "GIF")
    return {
        "not an image": (b"%PDF-1.4 this is a document, not a photograph", "not an image file"),
        "empty": (b"", "empty input"),
        "truncated JPEG": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "truncated PNG": (png[: len(png) // 2], "truncated PNG"),
        "corrupt JPEG scan data": (jpeg[:scan] + garbage + b"\xff\xd9", "corrupt JPEG data"),
        "JPEG header only": (jpeg[:scan], "truncated JPEG"),
        "PNG header only": (png_claiming(900, 700, pixels=False), "damaged PNG"),
        "too small": (encode(cv2.resize(fundus, (100, 80)), ".png"), "too small"),
        "PNG bomb 50000x50000": (png_claiming(50000, 50000), "over the limit of 60000000"),
        "JPEG bomb 50000x50000": (bytes(bomb_jpeg), "over the limit of 60000000"),
        "over the pixel limit": (over_pixels, "8000x8000 = 64000000 pixels, over the limit"),
        "all black": (encode(np.zeros((600, 800, 3), np.uint8), ".png"), "no retinal field of view"),
        "blank white": (encode(np.full((600, 800, 3), 255, np.uint8)), "uniform area"),
        "unsupported format (GIF)": (gif, "unsupported image format GIF"),
    }


def processed_inputs() -> dict[str, tuple[bytes, int]]:
    """Unusual but readable photos: processed; (bytes, the EXIF orientation the report must give)."""
    fundus, _ = synthetic_fundus(800, 600)
    rgb = Image.fromarray(cv2.cvtColor(fundus, cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": reported, not applied
    natural = cv2.resize(np.random.default_rng(1).integers(40, 256, (30, 40, 3), dtype=np.uint8), (800, 600),
                         interpolation=cv2.INTER_CUBIC)
    return {
        "grayscale": (encode(cv2.cvtColor(fundus, cv2.COLOR_BGR2GRAY), ".png"), 1),
        "16-bit": (encode(fundus.astype(np.uint16) * 257, ".png"), 1),
        "alpha channel": (encode(cv2.cvtColor(fundus, cv2.COLOR_BGR2BGRA), ".png"), 1),
        "palette": (pil_bytes(rgb.convert("P", palette=Image.ADAPTIVE), "PNG"), 1),
        "CMYK JPEG": (pil_bytes(rgb.convert("CMYK"), "JPEG"), 1),
        "EXIF-rotated": (pil_bytes(rgb, "JPEG", exif=exif), 6),
        "bright, no dark border": (encode(natural), 1),
        "bytes after the end marker": (encode(fundus) + b"trailing bytes" * 100, 1),
    }


# ---------------------------------------------------------------------------------------- bad inputs

def test_bad_photos_mixed_with_a_good_one_each_get_their_reason(triton_server, sample_bytes):
    errors = error_inputs()
    photos = [sample_bytes[0]] + [data for data, _ in errors.values()]
    assert len(photos) <= 16
    reports, masks = reports_and_masks(infer(make_client(triton_server, "http"), "http", photos))
    assert reports[0]["status"] == "ok" and mask_shape(masks[0]) == (2848, 4288)
    for i, (kind, (_, reason)) in enumerate(errors.items(), start=1):
        assert reports[i]["status"] == "error", kind
        assert reports[i]["image_index"] == i, kind
        assert reason in reports[i]["error"] and not re.match(r"image \d+: ", reports[i]["error"]), (kind, reports[i])
        assert masks[i] == b"", kind


def test_unusual_encodings_are_processed_and_exif_is_reported_not_applied(triton_server):
    inputs = processed_inputs()
    photos = [data for data, _ in inputs.values()] + [b"not a photo"]
    reports, masks = reports_and_masks(infer(make_client(triton_server, "grpc"), "grpc", photos))
    for i, (kind, (data, orientation)) in enumerate(inputs.items()):
        # Read fine, then refused by the image-quality gate: no colour (no haemorrhage contrast), or a smooth
        # picture without the retina's fine detail.
        gate = {"grayscale": ["not a colour photograph"], "bright, no dark border": ["out of focus"]}
        if kind in gate:
            assert reports[i]["status"] == "ungradable", reports[i]
            assert reports[i]["image_quality"]["reasons"] == gate[kind], reports[i]
        else:
            assert reports[i]["status"] == "ok", (kind, reports[i])
        # The mask follows the stored pixels (800x600), whatever the EXIF orientation says.
        assert mask_shape(masks[i]) == (600, 800), kind
        assert reports[i]["image"] == {"width": 800, "height": 600, "exif_orientation": orientation}, kind
    fov = reports[list(inputs).index("bright, no dark border")]["field_of_view"]
    assert fov["bbox"] == {"x": 0, "y": 0, "width": 800, "height": 600}  # the whole frame
    assert reports[-1]["status"] == "error" and reports[-1]["error"].startswith("not an image")


def test_request_of_only_bad_photos_is_answered_naming_each(triton_server):
    oversize = b"\xff\xd8\xff" + bytes(MAX_BYTES - 2)  # one byte over the per-photo limit
    reports, masks = reports_and_masks(infer(make_client(triton_server, "grpc"), "grpc", [oversize, b""]))
    assert [r["status"] for r in reports] == ["error", "error"] and masks == [b"", b""]
    assert reports[0]["error"] == f"file is {MAX_BYTES + 1} bytes, over the limit of {MAX_BYTES} bytes"
    assert reports[1]["error"] == "empty input: no image bytes"


def _raw_http(server, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{ENSEMBLE}/infer", data=body,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_malformed_requests_are_refused_and_the_server_keeps_serving(triton_server, sample_bytes):
    client = make_client(triton_server, "grpc")

    def refused(inputs, pattern):
        with pytest.raises(InferenceServerException, match=pattern):
            client.infer(ENSEMBLE, inputs)

    wrong_dtype = grpcclient.InferInput("IMAGE", [1, 1], "FP32")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 1), np.float32))
    refused([wrong_dtype], "data-type is .FP32., but model .hemorrhage_segmentation. expects .BYTES.")
    wrong_shape = grpcclient.InferInput("IMAGE", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    refused([wrong_shape], r"unexpected shape for input 'IMAGE'.*Expected \[-1,1\], got \[1,2\]")
    rank_one = grpcclient.InferInput("IMAGE", [2], "BYTES")
    rank_one.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    refused([rank_one], r"unexpected shape for input 'IMAGE'.*Expected \[-1,1\], got \[2\]")
    too_many = grpcclient.InferInput("IMAGE", [17, 1], "BYTES")
    too_many.set_data_from_numpy(np.array([[b"x"]] * 17, dtype=np.object_))
    refused([too_many], "inference request batch-size must be <= 16")
    unknown = grpcclient.InferInput("PHOTO", [1, 1], "BYTES")
    unknown.set_data_from_numpy(np.array([[b"x"]], dtype=np.object_))
    refused([unknown], "unexpected inference input 'PHOTO'")
    refused([], "expected 1 inputs but got 0")

    # HTTP/JSON: Triton 2.51 answers a body that is not JSON with 500, the others with 400.
    assert _raw_http(triton_server, b"{this is not json") == (
        500, '{"error":"failed to parse the request JSON buffer: Missing a name for object member. at 1"}')
    status, text = _raw_http(triton_server, json.dumps(
        {"inputs": [{"name": "IMAGE", "shape": [2, 1], "datatype": "BYTES", "data": ["only one"]}]}).encode())
    assert status == 400 and "expected 2 string elements for inference input 'IMAGE'" in text, text
    status, text = _raw_http(triton_server, b'{"inputs":[]}', {"Inference-Header-Content-Length": "999999"})
    assert status == 400 and "inference header size should be in range" in text, text

    assert client.is_server_ready()
    reports, _ = reports_and_masks(infer(client, "grpc", sample_bytes[:1]))
    assert reports[0]["status"] == "ok"


# ------------------------------------------------------------------------------------------ secure defaults

def _admin_request(server, path: str, key: str | None, body: bytes | None = b"{}") -> int:
    headers = {"admin-key": key} if key else {}
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_repository_trace_and_logging_apis_need_the_admin_key(triton_server):
    for path, body in (("/v2/repository/models/postprocess/load", b"{}"), ("/v2/repository/index", b"{}"),
                       ("/v2/logging", None), ("/v2/trace/setting", None),
                       ("/v2/systemsharedmemory/status", None)):
        assert _admin_request(triton_server, path, None, body) != 200, path
        assert _admin_request(triton_server, path, "wrong-key", body) != 200, path
    assert _admin_request(triton_server, "/v2/logging", triton_server.admin_key, None) == 200
    grpc = make_client(triton_server, "grpc")
    with pytest.raises(InferenceServerException):
        grpc.load_model("postprocess")
    # With the key, a reload goes through and the service keeps serving.
    assert _admin_request(triton_server, "/v2/repository/models/postprocess/load", triton_server.admin_key) == 200
    assert grpc.is_model_ready("postprocess") and grpc.is_model_ready(ENSEMBLE)
    assert grpcclient.InferenceServerClient(triton_server.grpc_url).is_server_ready()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_grpc_tls_and_the_request_byte_limit(tmp_path, sample_bytes):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    limit = len(sample_bytes[0]) + len(sample_bytes[1]) - 1  # two photos are one byte too many
    with dedicated_server(tmp_path, extra_args=("--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key),
                                                "--max-request-bytes", str(limit), "--poll-interval", "0",
                                                "--watchdog-interval", "0")) as server:
        tls = grpcclient.InferenceServerClient(f"localhost:{server.grpc_port}", ssl=True,
                                               root_certificates=str(cert))
        reports, _ = reports_and_masks(infer(tls, "grpc", sample_bytes[:1]))
        assert reports[0]["status"] == "ok"
        with pytest.raises(InferenceServerException, match=f"over the limit of {limit} bytes per request"):
            infer(tls, "grpc", sample_bytes[:2])
        plain = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            plain.is_server_ready()
        assert tls.is_server_ready()


# ------------------------------------------------------------------------------------------------- faults

@contextmanager
def dedicated_server(tmp_path: Path, repository: Path = REPO_ROOT / "model_repository", extra_args=()):
    server = start_server(tmp_path, repository, extra_args=tuple(extra_args))
    try:
        yield server
    finally:
        stop_server(server)


def triton_pid(server) -> int:
    return next(p.pid for p in psutil.Process(server.process.pid).children() if p.name() == "tritonserver")


def test_killed_stubs_are_restarted_under_load(tmp_path):
    with dedicated_server(tmp_path) as server:
        results = kill_stub.run(server.grpc_url, triton_pid(server), [small_photo()],
                                models=("unet", "preprocess", "postprocess"), clients=2, recovery_timeout=60.0,
                                settle=3.0, pause=0.0)
        log = server.log()
    print(kill_stub.markdown(results))
    for r in results:
        assert r["recovered"] and r["recovery_s"] < 60.0, (r, log[-3000:])
    assert log.count("watchdog: model") >= 3, log[-3000:]


def test_sigterm_under_load_completes_in_flight_requests_and_exits_zero(tmp_path):
    photo = small_photo()
    server = start_server(tmp_path, extra_args=("--poll-interval", "0", "--watchdog-interval", "0"))
    records: list[dict] = []
    in_flight = [0]
    lock = threading.Lock()
    done = threading.Event()

    def client_loop():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        while not done.is_set():
            start = time.monotonic()
            with lock:
                in_flight[0] += 1
            try:
                reports, _ = reports_and_masks(infer(client, "grpc", [photo, photo]))
                outcome = {"ok": all(r["status"] == "ok" for r in reports), "error": ""}
            except InferenceServerException as exc:
                outcome = {"ok": False, "status": str(exc.status()), "error": str(exc)[:300]}
            with lock:
                in_flight[0] -= 1
                records.append({"start": start, "end": time.monotonic(), **outcome})
            if not outcome["ok"]:
                time.sleep(0.2)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(records) < 4 or in_flight[0] < 3):
            time.sleep(0.05)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(120)
    finally:
        done.set()
        for t in threads:
            t.join(60)
        stop_server(server)
    before = [r for r in records if r["start"] < signalled]
    after = [r for r in records if r["start"] >= signalled]
    assert sum(r["end"] > signalled for r in before) >= 2, records  # requests were in flight at the signal
    assert all(r["ok"] for r in before), [r for r in before if not r["ok"]]
    assert all(r["ok"] or r.get("status") == "StatusCode.UNAVAILABLE" for r in after), \
        [(round(r["start"] - signalled, 2), r.get("status"), r["error"]) for r in after if not r["ok"]][:40]
    assert code == 0, server.log()[-3000:]


def _wait_for(predicate, timeout: float, what: str, server):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{server.log()[-4000:]}")


def _wrong_shape_onnx(path: Path) -> None:
    """A valid ONNX model with the wrong output: [N, 3, 640, 640] instead of [N, 1, 640, 640]."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, 640, 640])
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 3, 640, 640])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["pixels"], ["probability"])], "wrong", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_model_updates_bad_versions_are_refused_good_ones_served_without_failures(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    unet = repo / "unet"
    shipped = sorted(int(d.name) for d in unet.iterdir() if d.name.isdigit())
    for old in shipped[:-1]:  # start from the newest shipped version alone, renumbered 1
        shutil.rmtree(unet / str(old))
    if shipped[-1] != 1:
        (unet / str(shipped[-1])).rename(unet / "1")
    _, threshold = read_identity(unet / "1" / "model.onnx")
    write_with_identity(unet / "1" / "model.onnx", unet / "1" / "model.onnx", 1, threshold)

    def new_version(v: int, onnx_writer=None, model_py: str | None = None) -> None:
        staging = tmp_path / f"staging-{v}"  # copy beside, then rename: the poller never sees half a folder
        shutil.copytree(unet / "1", staging, ignore=shutil.ignore_patterns("__pycache__"))
        # Each version's graph names its own number: a copy renumbered as it is would be refused.
        write_with_identity(staging / "model.onnx", staging / "model.onnx", v, threshold)
        if onnx_writer:
            onnx_writer(staging / "model.onnx")
        if model_py is not None:
            (staging / "model.py").write_text(model_py)
        staging.rename(unet / str(v))

    with dedicated_server(tmp_path, repo, extra_args=("--poll-interval", "1")) as server:
        http = httpclient.InferenceServerClient(server.http_url)

        def served_versions() -> set[str]:
            index = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"http://{server.http_url}/v2/repository/index", data=b"{}",
                headers={"admin-key": server.admin_key}), timeout=30).read())
            return {m["version"] for m in index if m["name"] == "unet" and m.get("state") == "READY"}

        with kill_stub.Load(server.grpc_url, [small_photo()], clients=2) as load:
            assert kill_stub.wait_serving(load, 60)
            t0 = time.monotonic()
            # (a) garbage instead of an ONNX model: refused by serve.py's check, version 1 keeps serving
            new_version(2, lambda p: p.write_bytes(b"not an onnx model" * 64))
            _wait_for(lambda: "model 'unet' version 2 refused" in server.log(), 60, "v2 refused", server)
            # (b) a valid ONNX model with the wrong output shape: refused too
            new_version(3, _wrong_shape_onnx)
            _wait_for(lambda: "model 'unet' version 3 refused" in server.log(), 60, "v3 refused", server)
            assert served_versions() == {"1"}
            # (c) a good version: served without a restart
            new_version(4)
            _wait_for(lambda: served_versions() == {"4"}, 90, "v4 served", server)
            # (d) a version that passes the ONNX check but that Triton cannot load: Triton refuses it and
            #     keeps version 4 (Triton 2.51 behaviour, verified here)
            new_version(5, model_py="raise RuntimeError('this version is broken')\n")
            _wait_for(lambda: "Triton refused model 'unet'" in server.log(), 90, "v5 refused by Triton", server)
            assert served_versions() == {"4"}
            assert kill_stub.wait_serving(load, 30)
            records = load.since(t0)
        result = infer(make_client(server, "grpc"), "grpc", [small_photo()])
        assert json.loads(result.as_numpy("LESIONS")[0, 0])["model"]["version"] == "4"
        assert http.is_model_ready(ENSEMBLE)
    failures = [r for r in records if not r.ok]
    assert len(records) >= 10 and not failures, (len(records), failures[:3])


# ------------------------------------------------------------------------------- units (no server needed)

def test_invalid_exif_orientation_is_ignored_and_benign_jpeg_warnings_are_accepted():
    from fundus_hemorrhage.preprocessing import preprocess
    fundus, _ = synthetic_fundus(800, 600)
    exif = Image.Exif()
    exif[0x0112] = 9  # not an orientation
    data = pil_bytes(Image.fromarray(cv2.cvtColor(fundus, cv2.COLOR_BGR2RGB)), "JPEG", exif=exif)
    assert preprocess(data).geometry.exif_orientation == 1
    # Two stray bytes before the end marker: libjpeg warns "2 extraneous bytes", the pixels are intact.
    jpeg = encode(fundus)
    assert preprocess(jpeg[:-2] + b"\x00\x00" + jpeg[-2:]).geometry.width == 800


def test_serve_command_line(tmp_path):
    import serve
    from fundus_hemorrhage_ops.serving import launcher
    assert launcher.default_max_request_bytes(REPO_ROOT / "model_repository") == 16 * MAX_BYTES
    assert launcher.default_max_request_bytes(tmp_path) == 16 * MAX_BYTES  # no config.pbtxt: the generated defaults
    cert = tmp_path / "cert.pem"
    cert.write_text("not read here")
    args = serve.parse_args(["--grpc-tls-cert", str(cert), "--grpc-tls-key", str(cert)])
    cmd = launcher.triton_command(args, Path("tritonserver"), None, "k")
    assert "--grpc-use-ssl=true" in cmd and "--grpc-use-ssl-mutual=true" not in cmd
    assert any(c.startswith("--http-restricted-api=model-repository,shared-memory,trace,logging:admin-key=k")
               for c in cmd)
    with pytest.raises(SystemExit):
        serve.parse_args(["--grpc-tls-cert", str(cert)])  # a key is needed too
    assert "PYTHONPATH" not in launcher.server_env([])
