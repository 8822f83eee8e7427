"""Integration tests: the real Triton server (serve.py) and the `hemorrhage_segmentation` ensemble,
over HTTP and gRPC with tritonclient."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fundus_hemorrhage.contract import MAX_BATCH_SIZE, REPORT_SCHEMA_VERSION
from fundus_hemorrhage_ops.engines.identity import write_with_identity
from fundus_hemorrhage.postprocessing import threshold_level
from tests.conftest import ENSEMBLE, REPO_ROOT, infer, make_client, start_server, stop_server
from tests.fundus import encode, synthetic_fundus

def decode_png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def photo_shape(data: bytes) -> tuple[int, int]:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION).shape[:2]


@pytest.fixture(params=["http", "grpc"])
def protocol(request):
    return request.param


@pytest.fixture
def client(triton_server, protocol):
    return make_client(triton_server, protocol)


def test_ensemble_metadata(triton_server):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    config = client.get_model_config(ENSEMBLE)
    assert config["platform"] == "ensemble" and config["max_batch_size"] == MAX_BATCH_SIZE
    meta = client.get_model_metadata(ENSEMBLE)
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("IMAGE", "BYTES")]
    assert {o["name"] for o in meta["outputs"]} == {"MASK", "LESIONS", "PROBABILITY"}


def test_one_photo(client, protocol, sample_bytes):
    result = infer(client, protocol, sample_bytes[:1])
    mask = decode_png(result.as_numpy("MASK")[0, 0])
    assert mask.ndim == 2 and mask.dtype == np.uint8
    assert mask.shape == photo_shape(sample_bytes[0]) == (2848, 4288)
    assert set(np.unique(mask)) <= {0, 255}
    report = json.loads(result.as_numpy("LESIONS")[0, 0])
    assert report["status"] == "ok" and report["schema_version"] == REPORT_SCHEMA_VERSION == "2.0"
    assert report["image"] == {"width": 4288, "height": 2848, "exif_orientation": 1}
    assert report["model"]["name"] == "unet" and report["model"]["version"].isdigit()
    assert report["totals"]["area_px"] == np.count_nonzero(mask)
    assert report["totals"]["count"] == len(report["lesions"])
    assert sum(q["count"] for q in report["quadrants"].values()) == report["totals"]["count"]
    assert result.as_numpy("PROBABILITY")[0, 0] == b""


def test_ten_photo_request(client, protocol, sample_bytes):
    # Ten photos of different sizes: the three samples, and downscaled copies of them.
    photos = list(sample_bytes)
    for data in sample_bytes:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        for scale in (0.5, 0.3):
            if len(photos) < 10:
                photos.append(encode(cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)))
    photos.append(encode(synthetic_fundus(1100, 900)[0], ".png"))
    assert len(photos) == 10
    result = infer(client, protocol, photos)
    masks, reports = result.as_numpy("MASK"), result.as_numpy("LESIONS")
    assert masks.shape == reports.shape == (10, 1)
    for i, data in enumerate(photos):
        report = json.loads(reports[i, 0])
        assert report["status"] == "ok" and report["image_index"] == i
        assert decode_png(masks[i, 0]).shape == photo_shape(data)


def test_probability_on_and_off(client, protocol, sample_bytes):
    result = infer(client, protocol, sample_bytes[1:2], probability=True)
    prob = decode_png(result.as_numpy("PROBABILITY")[0, 0])
    mask = decode_png(result.as_numpy("MASK")[0, 0])
    report = json.loads(result.as_numpy("LESIONS")[0, 0])
    assert prob.shape == mask.shape == photo_shape(sample_bytes[1])
    level = threshold_level(report["threshold"])
    # The mask is the thresholded probability, less the specks below the minimum lesion area.
    assert np.all(prob[mask > 0] >= level)
    assert np.count_nonzero((prob >= level) & (mask == 0)) <= max(1, np.count_nonzero(prob >= level)) * 0.5
    off = infer(client, protocol, sample_bytes[1:2], probability=False)
    assert off.as_numpy("PROBABILITY")[0, 0] == b""
    assert np.array_equal(decode_png(off.as_numpy("MASK")[0, 0]), mask)


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp"])
def test_other_formats(triton_server, ext, sample_bytes):
    img = cv2.imdecode(np.frombuffer(sample_bytes[2], np.uint8), cv2.IMREAD_COLOR)
    img = cv2.resize(img, (1072, 712), interpolation=cv2.INTER_AREA)
    result = infer(make_client(triton_server, "grpc"), "grpc", [encode(img, ext)])
    assert decode_png(result.as_numpy("MASK")[0, 0]).shape == (712, 1072)
    assert json.loads(result.as_numpy("LESIONS")[0, 0])["status"] == "ok"


def lesion_reports(result) -> list[dict]:
    return [json.loads(r) for r in result.as_numpy("LESIONS").reshape(-1)]


def test_garbage_is_answered_with_a_reason_and_the_server_keeps_serving(client, protocol, sample_bytes):
    """A request of only unreadable photos is answered like any other: an error report per photo, its reason as
    data (no image index in the text), no mask."""
    (report,) = lesion_reports(infer(client, protocol, [b"definitely not a photograph"]))
    assert report["status"] == "error" and report["error"].startswith("not an image file")
    result = infer(client, protocol, [b"", b"\x89PNG\r\n\x1a\n"])
    empty, damaged = lesion_reports(result)
    assert (empty["image_index"], empty["error"]) == (0, "empty input: no image bytes")
    assert damaged["image_index"] == 1 and damaged["error"].startswith("damaged PNG")
    assert list(result.as_numpy("MASK").reshape(-1)) == [b"", b""]
    assert client.is_server_ready()
    assert json.loads(infer(client, protocol, sample_bytes[:1]).as_numpy("LESIONS")[0, 0])["status"] == "ok"


def test_bad_photo_does_not_fail_its_neighbours_in_a_request(client, protocol, sample_bytes):
    data = sample_bytes[0]
    result = infer(client, protocol, [data, data[: len(data) // 3], b"garbage"])
    reports = [json.loads(r[0]) for r in result.as_numpy("LESIONS")]
    assert reports[0]["status"] == "ok"
    assert reports[1]["status"] == "error" and reports[1]["error"].startswith("truncated JPEG")
    assert reports[2]["status"] == "error" and reports[2]["error"].startswith("not an image file")
    masks = result.as_numpy("MASK")
    assert decode_png(masks[0, 0]).shape == (2848, 4288) and masks[1, 0] == b"" and masks[2, 0] == b""


def test_bad_request_does_not_fail_concurrent_requests(triton_server, sample_bytes):
    def good(i):
        result = infer(make_client(triton_server, "grpc"), "grpc", [sample_bytes[i % 3]])
        return json.loads(result.as_numpy("LESIONS")[0, 0])["status"]

    def bad(_):
        (report,) = lesion_reports(infer(make_client(triton_server, "grpc"), "grpc", [b"junk"]))
        return "refused" if report["error"].startswith("not an image file") else str(report)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(good if i % 2 == 0 else bad, i) for i in range(8)]
        results = [f.result() for f in futures]
    assert results == ["ok", "refused"] * 4


def test_too_many_photos_and_wrong_dtype_are_refused(triton_server, sample_bytes):
    client = make_client(triton_server, "grpc")
    with pytest.raises(InferenceServerException, match="batch"):
        infer(client, "grpc", [b"x"] * 17)
    wrong = grpcclient.InferInput("IMAGE", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1), np.float32))
    with pytest.raises(InferenceServerException, match="data-type is .FP32., but model .hemorrhage_segmentation. expects .BYTES."):
        client.infer(ENSEMBLE, [wrong])
    assert client.is_server_ready()


def test_model_control_api_is_closed_without_the_key(triton_server):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    with pytest.raises(InferenceServerException, match="(?i)restricted|unavailable|denied|key"):
        client.load_model("unet")
    grpc = make_client(triton_server, "grpc")
    with pytest.raises(InferenceServerException):
        grpc.unload_model("unet")
    assert grpc.is_model_ready("unet")


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path, sample_bytes):
    server = start_server(tmp_path)
    try:
        client = make_client(server, "grpc")
        outcome = {}

        def in_flight():
            try:
                result = infer(client, "grpc", sample_bytes * 2)
                outcome["statuses"] = [json.loads(r[0])["status"] for r in result.as_numpy("LESIONS")]
            except Exception as exc:  # recorded and asserted below
                outcome["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.5)  # the request is in the pipeline
        server.process.send_signal(signal.SIGTERM)
        thread.join(120)
        code = server.process.wait(120)
    finally:
        stop_server(server)
    assert outcome.get("statuses") == ["ok"] * 6, outcome
    assert code == 0, server.log()[-3000:]


def test_a_chosen_unet_version_is_served(tmp_path, sample_bytes):
    """serve.py --unet-version N serves that version instead of the newest (both stay in the repository)."""
    repository = tmp_path / "model_repository"
    shutil.copytree(REPO_ROOT / "model_repository", repository, ignore=shutil.ignore_patterns("__pycache__"))
    newest = max(int(d.name) for d in (repository / "unet").iterdir() if d.name.isdigit())
    copy = repository / "unet" / str(newest + 1)
    shutil.copytree(repository / "unet" / str(newest), copy)
    threshold = json.loads((copy / "model.json").read_text())["threshold"]
    write_with_identity(copy / "model.onnx", copy / "model.onnx", newest + 1, threshold)  # a version names itself
    versions = {}
    for pinned in (None, newest):
        server = start_server(tmp_path, repository, extra_args=("--unet-version", str(pinned)) if pinned else ())
        try:
            result = infer(make_client(server, "grpc"), "grpc", sample_bytes[:1])
            versions[pinned] = json.loads(result.as_numpy("LESIONS")[0, 0])["model"]["version"]
        finally:
            assert stop_server(server) == 0
    assert versions == {None: str(newest + 1), newest: str(newest)}
