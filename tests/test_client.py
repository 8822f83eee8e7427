"""The client library (fundus_hemorrhage.client) and segment.py, the clinic's command line over it: against the
real Triton (gRPC and HTTP) and offline."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT, SAMPLE_PHOTOS, free_ports, make_client
from fundus_hemorrhage import client as service

SEGMENT = REPO_ROOT / "segment.py"
GARBAGE = b"this is not a photo\n" * 50


def load_segment():
    """segment.py as a module (a script at the repository root, not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("segment", SEGMENT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the importlib recipe: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


segment = load_segment()


def run_segment(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SEGMENT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def read_photo(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert image is not None, path
    return image


def check_good_outputs(out: Path, stem: str, photo: Path, probability: bool = False) -> None:
    shape = read_photo(photo).shape
    mask = cv2.imread(str(out / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.dtype == np.uint8 and mask.shape == shape[:2]
    assert set(np.unique(mask).tolist()) <= {0, 255}
    overlay = cv2.imread(str(out / f"{stem}_overlay.png"), cv2.IMREAD_UNCHANGED)
    assert overlay is not None and overlay.shape == shape
    report = json.loads((out / f"{stem}_lesions.json").read_text())
    assert report["status"] == "ok"
    assert report["image"] == {"width": shape[1], "height": shape[0], "exif_orientation": 1}
    assert report["totals"]["count"] == len(report["lesions"])
    assert report["totals"]["area_px"] == int(np.count_nonzero(mask))
    assert Path(report["source"]).name == photo.name
    prob_path = out / f"{stem}_probability.png"
    if probability:
        prob = cv2.imread(str(prob_path), cv2.IMREAD_UNCHANGED)
        assert prob is not None and prob.shape == shape[:2]
    else:
        assert not prob_path.exists()


def check_garbage_outputs(out: Path, stem: str) -> None:
    report = json.loads((out / f"{stem}_lesions.json").read_text())
    assert report["status"] == "error" and "not an image" in report["error"]
    assert "request failed" not in report["error"] and ";" not in report["error"]  # its own reason only
    assert not (out / f"{stem}_mask.png").exists() and not (out / f"{stem}_overlay.png").exists()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_library_answers_each_photo(triton_server, protocol):
    client = make_client(triton_server, protocol)
    service.check_server(client, protocol, "test server")
    photo = SAMPLE_PHOTOS[0].read_bytes()
    # A mixed request: the ensemble answers it with an error report for the unreadable photo.
    good, bad = service.segment(client, protocol, [photo, GARBAGE], probability=True)
    assert good.ok and good.report["status"] == "ok" and good.mask_png[:4] == b"\x89PNG" and good.probability_png
    assert not bad.ok and "not an image" in bad.error and not bad.mask_png and bad.report["status"] == "error"
    # Refused as a whole (nothing readable): retried photo by photo, each with its own reason.
    first, second = service.segment(client, protocol, [GARBAGE, b""])
    assert "not an image" in first.error and first.error != second.error and second.error
    assert all("request failed" not in r.error and "image 0" not in r.error for r in (first, second))
    assert first.seconds > 0


def test_library_unreachable_server():
    url = f"127.0.0.1:{free_ports(1)[0]}"
    for protocol in ("grpc", "http"):
        client = service.make_client(url, protocol, timeout=5)
        with pytest.raises(service.ServerNotReady, match="cannot reach Triton"):
            service.check_server(client, protocol, url, timeout=5)
        (result,) = service.segment(client, protocol, [GARBAGE], timeout=5)
        assert not result.ok and result.report["status"] == "error"


def test_photo_reason():
    assert service.photo_reason("in ensemble 'x', image 3: not an image file") == "not an image file"
    assert service.normalise_url("http://host:9/", "http") == "host:9"
    assert service.normalise_url(None, "grpc") == "127.0.0.1:8001"


def test_grpc_mixed_request_and_whole_request_refusal(triton_server, tmp_path):
    # Two unreadable files first: with --batch-size 2 the server refuses that whole request, so the client
    # retries them one at a time; then the samples in mixed/normal requests, with the probability map.
    bad = [tmp_path / "garbage.jpg", tmp_path / "broken.png"]
    for path in bad:
        path.write_bytes(GARBAGE)
    out = tmp_path / "out"
    proc = run_segment(*bad, *SAMPLE_PHOTOS, "--output", out, "--url", triton_server.grpc_url,
                       "--batch-size", "2", "--probability")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for path in bad:
        assert path.name in proc.stdout
        check_garbage_outputs(out, path.stem)
    assert "not an image file" in proc.stdout
    assert f"{len(SAMPLE_PHOTOS)} of {len(SAMPLE_PHOTOS) + 2} photos segmented" in proc.stdout
    for photo in SAMPLE_PHOTOS:
        assert photo.name in proc.stdout
        check_good_outputs(out, photo.stem, photo, probability=True)


def test_http_folder_argument(triton_server, tmp_path):
    # A folder (searched recursively) holding the samples, a garbage "photo", a non-photo file and the
    # output folder itself; one request over HTTP.
    folder = tmp_path / "clinic"
    (folder / "visit2").mkdir(parents=True)
    photos = []
    for i, photo in enumerate(SAMPLE_PHOTOS):
        target = (folder / "visit2" if i % 2 else folder) / photo.name
        target.symlink_to(photo)
        photos.append(target)
    (folder / "visit2" / "garbage.jpg").write_bytes(GARBAGE)
    (folder / "notes.txt").write_text("not a photo")
    out = folder / "results"
    out.mkdir()
    (out / "old_mask.png").write_bytes(GARBAGE)  # must not be picked up as a photo
    proc = run_segment(folder, "--output", out, "--protocol", "http", "--url", triton_server.http_url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "garbage.jpg" in proc.stdout and "notes.txt" not in proc.stdout and "old_mask" not in proc.stdout
    assert f"{len(photos)} of {len(photos) + 1} photos segmented" in proc.stdout
    check_garbage_outputs(out, "garbage")
    for photo in photos:
        check_good_outputs(out, photo.stem, photo)


def test_unreachable_server_is_a_usage_error(tmp_path):
    port = free_ports(1)[0]
    for protocol in ("grpc", "http"):
        proc = run_segment(SAMPLE_PHOTOS[0], "--output", tmp_path / "out", "--protocol", protocol,
                           "--url", f"127.0.0.1:{port}", "--timeout", "5", timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and "cannot reach Triton" in lines[0] and f"127.0.0.1:{port}" in lines[0], lines


def test_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_segment(tmp_path / "empty", "--output", tmp_path / "out", "--url", "127.0.0.1:1", timeout=60)
    assert proc.returncode == 2 and "no photos found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_segment(tmp_path / "missing.jpg", "--output", tmp_path / "out", timeout=60)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = run_segment(SAMPLE_PHOTOS[0], "--output", tmp_path / "out", "--batch-size", "17", timeout=60)
    assert proc.returncode == 2
    proc = run_segment("--help", timeout=60)
    assert proc.returncode == 0 and "--probability" in proc.stdout and "_overlay.png" in proc.stdout


def test_collect_photos(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/x.JPG", "a/b/x.png", "a/b/y.tiff", "a/b/x.jpg", "a/notes.txt", "a/.z.jpg", ".hidden/h.jpg",
                 "a/scan.dat"):
        (tmp_path / name).write_bytes(b"")
    out = tmp_path / "a" / "out"
    out.mkdir()
    (out / "x_mask.png").write_bytes(b"")
    photos = segment.collect_photos([tmp_path / "a", tmp_path / "a" / "x.JPG", tmp_path / "a" / "scan.dat"],
                                    exclude=out)
    rel = [p.path.relative_to(tmp_path).as_posix() for p in photos]
    assert rel == ["a/x.JPG", "a/b/x.jpg", "a/b/x.png", "a/b/y.tiff", "a/scan.dat"]  # each once, as named
    names = [p.name for p in photos]
    assert names == ["x", "x_jpg", "x_png", "y", "scan"] and len(set(names)) == len(names)
    assert segment.collect_photos([tmp_path / ".hidden" / "h.jpg"])[0].name == "h"  # named explicitly
    with pytest.raises(segment.UsageError):
        segment.collect_photos([tmp_path / "nope"])


def test_draw_overlay_outlines_lesions_outside_their_edge():
    photo = np.full((300, 400, 3), 60, np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    mask[100:150, 200:260] = 255
    photo_png = cv2.imencode(".png", photo)[1].tobytes()
    overlay = segment.draw_overlay(photo_png, cv2.imencode(".png", mask)[1].tobytes())
    assert overlay.shape == photo.shape
    changed = np.any(overlay != photo, axis=2)
    assert changed.any() and not changed[mask > 0].any()  # the lesion itself is left visible
    assert changed[98, 230] and not changed[10, 10]  # a ring just outside it, nothing far away
    assert tuple(overlay[98, 230]) == segment.OUTLINE_BGR
    empty = segment.draw_overlay(photo_png, cv2.imencode(".png", np.zeros_like(mask))[1].tobytes())
    assert np.array_equal(empty, photo)
    with pytest.raises(ValueError):
        segment.draw_overlay(photo_png, cv2.imencode(".png", mask[:100])[1].tobytes())
