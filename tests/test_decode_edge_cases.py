"""Decode edge cases of issue 12 through the serving paths (fundus_hemorrhage.pipeline and the real server):

* orientation: pixels as stored and the tag reported, for TIFF (OpenCV's TIFF decoder applies the tag in spite of
  IMREAD_IGNORE_ORIENTATION) and PNG eXIf as for JPEG (docs/reliability.md, row 16);
* bytes after the end marker: a complete JPEG followed by 100 kB of zeros is served, a cut one refused (rows 4, 22);
* base64 text sent as a JSON "data" string over HTTP: refused saying so (the KServe protocol takes JSON strings as
  raw bytes).

Unit-level cases (every orientation of every TIFF kind, padding, MPO, data: URLs) are in tests/test_preprocess.py.
"""

from __future__ import annotations

import base64
import io
import json

import cv2
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.pipeline import Pipeline
from tests.conftest import REPO_ROOT, SAMPLE_PHOTOS, infer, make_client

UNET = REPO_ROOT / "model_repository" / c.SEGMENTATION_MODEL
NEWEST_UNET = UNET / str(max(int(d.name) for d in UNET.iterdir() if d.name.isdigit())) / "model.onnx"


def _portrait_rgb() -> np.ndarray:
    """A real photo at a quarter of its size, stored portrait: 712 wide, 1072 high (as a camera held upright
    writes it, with an orientation tag for display)."""
    bgr = cv2.resize(cv2.imread(str(SAMPLE_PHOTOS[0]), cv2.IMREAD_COLOR), (1072, 712), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).transpose(1, 0, 2))


def _saved(rgb: np.ndarray, fmt: str, orientation: int, **kw) -> bytes:
    buf = io.BytesIO()
    if fmt == "TIFF":
        kw["tiffinfo"] = {0x0112: orientation}
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def _mask_shape(png: bytes) -> tuple[int, int]:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]


STORED = {"width": 712, "height": 1072}


def test_pipeline_masks_follow_the_stored_pixels_and_report_the_orientation():
    rgb = _portrait_rgb()
    tiffs = [_saved(rgb, "TIFF", o, compression="tiff_lzw") for o in range(1, 9)]
    png = _saved(rgb, "PNG", 6)
    jpeg = SAMPLE_PHOTOS[1].read_bytes()
    photos = [*tiffs, png, jpeg, jpeg + bytes(100_000), jpeg[: len(jpeg) // 2] + bytes(100_000),
              base64.b64encode(jpeg)]
    pipeline = Pipeline.from_onnx(NEWEST_UNET)
    try:
        results = pipeline(photos)
    finally:
        pipeline.close()
    for orientation, result in enumerate(results[:8], start=1):
        assert result.ok, result.report
        assert result.report["image"] == {**STORED, "exif_orientation": orientation}
        assert _mask_shape(result.mask_png) == (1072, 712), orientation  # (rows, columns) as stored
        assert result.mask_png == results[0].mask_png, orientation  # the same stored pixels, the same mask
        assert result.report["lesions"] == results[0].report["lesions"], orientation
    assert results[8].report["image"] == {**STORED, "exif_orientation": 6}
    assert _mask_shape(results[8].mask_png) == (1072, 712)
    assert results[10].ok and results[10].mask_png == results[9].mask_png  # 100 kB of zero padding: no difference
    assert results[10].report == {**results[9].report, "image_index": 10}
    assert results[11].report["error"] == "truncated JPEG: the end-of-image marker is missing"
    assert results[11].report["image_index"] == 11 and results[11].error == results[11].report["error"]
    assert results[12].report["error"].startswith("not an image file: the bytes are base64 text of a JPEG")


def test_server_serves_stored_pixels_padded_jpegs_and_refuses_cut_ones(triton_server, sample_bytes):
    rgb = _portrait_rgb()
    jpeg = sample_bytes[0]
    photos = [_saved(rgb, "TIFF", 1), _saved(rgb, "TIFF", 6), _saved(rgb, "PNG", 6),
              jpeg, jpeg + bytes(100_000), jpeg[: len(jpeg) // 2] + bytes(100_000)]
    result = infer(make_client(triton_server, "grpc"), "grpc", photos, outputs=(c.MASK, c.LESIONS))
    masks = list(result.as_numpy(c.MASK).reshape(-1))
    reports = [json.loads(r) for r in result.as_numpy(c.LESIONS).reshape(-1)]
    for i, orientation in enumerate((1, 6, 6)):
        assert reports[i]["status"] == "ok", reports[i]
        assert reports[i]["image"] == {**STORED, "exif_orientation": orientation}
        assert _mask_shape(masks[i]) == (1072, 712)
    assert masks[1] == masks[0]  # orientation 6 is reported, not applied
    assert reports[4]["status"] == "ok" and masks[4] == masks[3] and _mask_shape(masks[4]) == (2848, 4288)
    assert reports[5] == {"schema_version": c.REPORT_SCHEMA_VERSION, "status": "error", "image_index": 5,
                          "error": "truncated JPEG: the end-of-image marker is missing"}
    assert masks[5] == b""


def test_base64_in_a_json_request_is_refused_saying_so(triton_server, sample_bytes):
    """Over HTTP without the binary extension, the "data" strings reach the model as their own bytes: each photo
    is answered with an error report that says so (the request itself succeeds, however many photos fail)."""
    client = make_client(triton_server, "http")
    encoded = base64.b64encode(sample_bytes[0])
    photos = np.array([[encoded], [b"data:image/jpeg;base64," + encoded]], dtype=np.object_)
    image = httpclient.InferInput(c.IMAGE, list(photos.shape), "BYTES")
    image.set_data_from_numpy(photos, binary_data=False)
    result = client.infer(c.ENSEMBLE, [image], outputs=[httpclient.InferRequestedOutput(c.LESIONS, binary_data=False)])
    first, second = (json.loads(r) for r in result.as_numpy(c.LESIONS).reshape(-1))
    assert first["status"] == second["status"] == "error" and (first["image_index"], second["image_index"]) == (0, 1)
    assert first["error"] == ("not an image file: the bytes are base64 text of a JPEG file, not the file itself (a "
                              "JSON request's \"data\" strings are taken as raw bytes: send the photo's bytes with "
                              "the binary tensor extension, as a raw body, or over gRPC)")
    assert second["error"].startswith("not an image file: the bytes are a data: URL (base64 text) of a JPEG file")
