"""The HTTP guard (fundus_hemorrhage/serving/http_proxy.py) through the real serve.py: compressed-body bombs and
oversized bodies are refused before Triton reads them, the service keeps serving, and the README's curl
examples work through the proxy.

The 2 GiB gzip bomb is the one of issue 12 (2,087,280 bytes of gzip inflating to 2 GiB, which made tritonserver
2.51 abort with signal 6 when it reached it): here it never reaches Triton.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import zlib
from pathlib import Path

import psutil
import pytest

from tests.conftest import ENSEMBLE, REPO_ROOT, SAMPLE_PHOTOS, make_client
from tests.conftest import infer as request_ensemble

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
                                reason="haproxy is not installed (make install)")
BOMB_BYTES = 2**31  # what the 2 GiB bomb inflates to


def deflate_stream(size: int, wbits: int) -> bytes:
    """`size` zero bytes compressed with zlib (wbits 31: gzip, 15: zlib/deflate), without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = bytes(2**24)
    parts = [compressor.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + compressor.flush()


def raw_post(port: int, headers: dict[str, str], body: bytes, path: str = f"/v2/models/{ENSEMBLE}/infer",
             send_body: bool = True, timeout: float = 60.0) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 POST over a plain socket (urllib would refuse some of these headers); (status, headers, body)."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n")
        if send_body:
            try:
                sock.sendall(body)
            except (BrokenPipeError, ConnectionResetError):  # refused before the body was read: fine
                pass
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode(errors="replace").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        fields = {k.lower(): v for k, v in fields.items()}
        length = int(fields.get("content-length", len(rest)))
        while len(rest) < length:
            more = sock.recv(65536)
            if not more:
                break
            rest += more
    return int(lines[0].split()[1]), fields, rest


def triton_of(server) -> psutil.Process:
    return next(p for p in psutil.Process(server.process.pid).children() if p.name() == "tritonserver")


def serves_a_photo(server, protocol: str = "http") -> bool:
    result = request_ensemble(make_client(server, protocol), protocol, [SAMPLE_PHOTOS[0].read_bytes()],
                              outputs=("LESIONS",))
    return json.loads(result.as_numpy("LESIONS")[0, 0])["status"] == "ok"


def test_compressed_body_bombs_are_refused_and_the_service_keeps_serving(triton_server):
    triton = triton_of(triton_server)
    rss_before = triton.memory_info().rss
    gzip_bomb = deflate_stream(BOMB_BYTES, 31)
    assert len(gzip_bomb) < 2_100_000  # the bomb: 2,087,280 bytes
    # The guard judges the header alone (no brotli encoder is installed: the br case carries the gzip bomb).
    cases = {"gzip": gzip_bomb, "deflate": deflate_stream(2**30, 15), "br": gzip_bomb,
             "x-gzip": gzip_bomb, "gzip, identity": gzip_bomb}
    for encoding, body in cases.items():
        status, headers, text = raw_post(triton_server.http_port, {
            "Content-Type": "application/json", "Content-Encoding": encoding,
            "Content-Length": str(len(body))}, body)
        assert status == 415, (encoding, status, text[:300])
        message = json.loads(text)["error"]
        assert f"Content-Encoding '{encoding}' is not accepted" in message and "uncompressed" in message
    assert triton.is_running() and triton.status() != psutil.STATUS_ZOMBIE
    assert triton.memory_info().rss < rss_before + 256 * 2**20  # nothing was inflated
    assert serves_a_photo(triton_server, "http") and serves_a_photo(triton_server, "grpc")


def test_oversized_and_unsized_bodies_are_refused_before_they_are_read(triton_server):
    limit = 16 * 64 * 2**20 + 2**20  # --max-request-bytes (default 1 GiB) + the header headroom
    for claimed in (limit + 1, 5_000_000_000):
        # Only the headers and 1 MB are sent: the answer comes at once, without waiting for the body.
        status, _, text = raw_post(triton_server.http_port, {"Content-Length": str(claimed),
                                                             "Content-Type": "application/octet-stream"},
                                   bytes(2**20), timeout=20)
        assert status == 413, (claimed, status, text[:300])
        assert f"the request body is {claimed} bytes, over the limit of {limit} bytes" in json.loads(text)["error"]
    status, _, text = raw_post(triton_server.http_port, {"Transfer-Encoding": "chunked"}, b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 411 and "Content-Length" in json.loads(text)["error"], (status, text)
    assert serves_a_photo(triton_server)


def test_the_proxy_passes_everything_else_through(triton_server, sample_bytes):
    port = triton_server.http_port
    # Health and metadata, over one kept-alive connection.
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{ENSEMBLE}", f"/v2/models/{ENSEMBLE}/config"):
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, path
        response.read()
    conn.close()
    # Triton's own errors come back unchanged (status and message).
    status, _, text = raw_post(port, {"Content-Type": "application/json", "Content-Length": "17"},
                               b"{this is not json")
    assert (status, json.loads(text)) == (500, {"error": "failed to parse the request JSON buffer: Missing a name "
                                                         "for object member. at 1"})
    status, _, text = raw_post(port, {"Content-Encoding": "identity", "Content-Length": "13"}, b'{"inputs":[]}')
    assert status == 400 and b"expected 1 inputs but got 0" in text, text


def test_readme_curl_examples_work_through_the_proxy(triton_server, tmp_path):
    """The commands of README.md "Calling the service with curl", run as written (HOST:PORT and photo.jpg set)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Calling the service with curl", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```sh\n")[1:]]
    assert len(blocks) >= 2, "the README section has no sh code blocks"
    shutil.copy(SAMPLE_PHOTOS[0], tmp_path / "photo.jpg")
    env = {"PATH": "/usr/bin:/bin", "HOST": triton_server.http_url}
    for block in blocks:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                              timeout=300)
        assert done.returncode == 0, (block, done.stderr.decode(errors="replace")[-2000:])
    for headers, response in (("headers.txt", "response.bin"), ("raw-headers.txt", "raw-response.bin")):
        # The answer: a JSON header (its length in Inference-Header-Content-Length), then the raw outputs.
        length = int(next(line.split(b":")[1] for line in (tmp_path / headers).read_bytes().splitlines()
                          if line.lower().startswith(b"inference-header-content-length")))
        body = (tmp_path / response).read_bytes()
        offset, found = length, {}
        for output in json.loads(body[:length])["outputs"]:
            size = output["parameters"]["binary_data_size"]
            found[output["name"]] = body[offset + 4:offset + size]  # a BYTES element: 4-byte length, then bytes
            offset += size
        report = json.loads(found["LESIONS"])
        assert report["status"] == "ok" and report["image"]["width"] == 4288, response
        assert found["MASK"].startswith(b"\x89PNG"), response
