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
    # Nothing readable: still one request, answered per photo, each with its own reason.
    first, second = service.segment(client, protocol, [GARBAGE, b""])
    assert "not an image" in first.error and second.error == "empty input: no image bytes"
    assert [r.report["image_index"] for r in (first, second)] == [0, 1] and first.status == "error"
    assert first.seconds > 0


def test_library_unreachable_server():
    url = f"127.0.0.1:{free_ports(1)[0]}"
    for protocol in ("grpc", "http"):
        client = service.make_client(url, protocol, timeout=5)
        with pytest.raises(service.ServerNotReady, match="cannot reach Triton"):
            service.check_server(client, protocol, url, timeout=5)
        (result,) = service.segment(client, protocol, [GARBAGE], timeout=5)
        assert not result.ok and result.report["status"] == "error"


def test_normalise_url():
    assert service.normalise_url("http://host:9/", "http") == "host:9"
    assert service.normalise_url(None, "grpc") == "127.0.0.1:8001"


def test_grpc_mixed_request_and_whole_request_refusal(triton_server, tmp_path):
    # Two unreadable files first (a request with nothing readable, answered per photo); then the samples in
    # mixed/normal requests, with the probability map.
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


def test_overlay_draws_the_etdrs_grid_disc_fovea_and_zone_colours():
    from fundus_hemorrhage import overlay

    photo = np.full((1000, 1400, 3), 60, np.uint8)
    mask = np.zeros((1000, 1400), np.uint8)
    mask[495:506, 695:706] = 255  # on the fovea: central subfield
    mask[200:221, 1200:1221] = 255  # far from it: outside the grid
    report = {
        "image": {"width": 1400, "height": 1000, "exif_orientation": 1},
        "eye": {"laterality": "right", "method": "disc_fovea_axis"},
        "optic_disc": {"center": {"x": 1150.0, "y": 500.0}, "diameter_px": 180.0, "confidence": 0.9},
        "fovea": {"center": {"x": 700.0, "y": 500.0}, "confidence": 0.9, "method": "detected"},
        "scale": {"disc_diameter_px": 180.0, "disc_diameter_um": 1800.0, "um_per_px": 10.0},
        "lesions": [
            {"id": 1, "bbox": {"x": 1200, "y": 200, "width": 21, "height": 21}, "area_px": 441,
             "etdrs_subfield": "outside"},
            {"id": 2, "bbox": {"x": 695, "y": 495, "width": 11, "height": 11}, "area_px": 121,
             "etdrs_subfield": "central"},
        ],
        "etdrs": {"central": {"count": 1}, "outside": {"count": 1}},
    }
    out = overlay.draw_overlay(photo, mask, report)
    assert out.shape == photo.shape and np.array_equal(out[mask > 0], photo[mask > 0])
    # 10 um per pixel: ETDRS circles of radius 50, 150 and 300 px around the fovea (700, 500); the disc's rim at
    # 90 px around (1150, 500); each lesion's outline in its zone's colour.
    for x in (700 - 150, 700 + 300, 700 - 300):
        assert tuple(out[500, x]) == overlay.GRID_BGR, x
    assert tuple(out[500 + 90, 1150]) == overlay.DISC_BGR
    assert tuple(out[493, 700]) == overlay.ZONE_COLOURS["central"]
    assert tuple(out[198, 1210]) == overlay.ZONE_COLOURS["outside"]
    assert not np.array_equal(out[10:60, 10:200], photo[10:60, 10:200])  # the legend
    rows = [text for _, text in overlay.legend_lines(report)]
    assert "Eye: right" in rows and any(text.startswith("central subfield") and text.endswith(": 1") for text in rows)
    # Without a retinal frame: plain outlines and the reason in the legend.
    no_frame = {"lesions": [], "anatomy_reasons": {"optic_disc": "not confident: no optic disc"}}
    assert any("no optic disc" in text for _, text in overlay.legend_lines(no_frame))


def test_index_escapes_text_and_links_relatively():
    from fundus_hemorrhage.report_index import render_index

    name = '<script>alert("x")</script> & #1.jpg'
    html = render_index([{"name": name, "ok": False, "error": "<b>bad</b>", "report": {}, "files": {
        "lesions": f"{name}_lesions.json"}}])
    assert "<script>" not in html and "<b>bad</b>" not in html
    assert "&lt;script&gt;" in html and "&lt;b&gt;bad&lt;/b&gt;" in html
    assert 'href="%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E%20%26%20%231.jpg_lesions.json"' in html


def chromium(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    import shutil
    import tempfile

    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (make install installs it)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = Array.from(document.images).map(i => i.complete + ":" + i.naturalWidth).join(" ");
  document.body.appendChild(out);
});
</script>"""


def test_index_html_renders_in_a_headless_browser(triton_server, tmp_path):
    """segment.py's index.html for a batch (the samples, a photo whose name needs escaping, an unreadable one)
    opened in a real headless Chromium: every photo has its row, every thumbnail loads, the page is not blank."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in SAMPLE_PHOTOS:
        (folder / photo.name).symlink_to(photo)
    (folder / "Ünal <&> #2 100%.jpg").write_bytes(SAMPLE_PHOTOS[0].read_bytes())  # a copy: links are deduplicated
    (folder / "garbage.jpg").write_bytes(GARBAGE)
    out = tmp_path / "out"
    proc = run_segment(folder, "--output", out, "--url", triton_server.grpc_url, "--batch-size", "4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    index = out / "index.html"
    assert index.is_file() and "index.html" in proc.stdout
    names = sorted(p.name for p in folder.iterdir())
    html = index.read_text(encoding="utf-8")
    assert "Ünal &lt;&amp;&gt; #2 100%.jpg" in html and "<&>" not in html
    # The same page with a script that records, once loaded, whether each image loaded and its natural width.
    check = out / "index_check.html"
    check.write_text(html.replace("</body>", CHECK_IMAGES + "</body>"), encoding="utf-8")
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        names, check = [], ""

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "tr" and attrs.get("class") == "photo":
                self.names.append(attrs["data-name"])

        def handle_data(self, data):
            if self.lasttag == "pre":
                self.check += data

    parsed = Rows()
    parsed.feed(dom.stdout)
    assert sorted(parsed.names) == names
    loaded = parsed.check.split()
    assert len(loaded) == len(names) - 1  # a thumbnail per segmented photo, none for the unreadable one
    assert all(state.startswith("true:") and int(state.split(":")[1]) > 0 for state in loaded), loaded
    # The page itself, as a screenshot: not blank.
    shot = tmp_path / "index.png"
    result = chromium("--window-size=1400,1200", f"--screenshot={shot}", index.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert pixels is not None and pixels.std() > 10
    assert np.count_nonzero(np.any(pixels < 200, axis=2)) > 0.05 * pixels.shape[0] * pixels.shape[1]


def test_routing_parameters_reach_the_router(triton_server, tmp_path):
    """--unet-version pins the version (named in the report); an unknown one is refused naming it."""
    newest = max(int(d.name) for d in (REPO_ROOT / "model_repository" / "unet").iterdir() if d.name.isdigit())
    out = tmp_path / "pinned"
    proc = run_segment(SAMPLE_PHOTOS[0], "--output", out, "--url", triton_server.grpc_url,
                       "--unet-version", newest, "--routing-key", "patient-17")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / f"{SAMPLE_PHOTOS[0].stem}_lesions.json").read_text())
    assert report["model"]["version"] == str(newest)
    proc = run_segment(SAMPLE_PHOTOS[0], "--output", tmp_path / "refused", "--url", triton_server.grpc_url,
                       "--unet-version", 999)
    assert proc.returncode == 1 and "999" in proc.stdout, proc.stdout + proc.stderr
    assert service.routing_parameters("k", 3) == {"routing_key": "k", "unet_version": 3}
    assert service.routing_parameters() == {}
