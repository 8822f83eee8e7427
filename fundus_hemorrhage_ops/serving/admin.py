"""Triton's HTTP API with the admin key: the repository index, served configs, load and unload.

serve.py starts Triton with the model-repository, shared-memory, trace and logging APIs restricted to requests
that carry the header `admin-key: <key>`; this client is how the supervisor and the drain use them.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request

ADMIN_HEADER = "admin-key"
MARKER = ".serve_py_run"  # added to every load with files: Triton's /tmp/folder* copy then names its serve.py run
LOAD_TIMEOUT = 300.0  # seconds: a model load (ONNX Runtime session, Python stubs) may take minutes on a busy CPU

log = logging.getLogger(__name__)


class Admin:
    """Triton's HTTP API at `url` (http://host:port), with the admin key for the restricted endpoints. `marker`
    (serve.py's run id): written as the file <version>/.serve_py_run into every load that sends files, so that
    the folder Triton copies them to under /tmp is known to be this run's (leftovers.py)."""

    def __init__(self, url: str, key: str, marker: str | None = None):
        self.url, self.key, self.marker = url, key, marker

    def call(self, path: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        """(HTTP status, body). Raises OSError when Triton does not answer at all."""
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers={ADMIN_HEADER: self.key})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str, body: bytes | None = None) -> object:
        """The JSON answer of a call; OSError unless HTTP 200."""
        status, data = self.call(path, body)
        if status != 200:
            raise OSError(f"{path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data or b"null")

    def index(self) -> list[dict]:
        """Every model version Triton knows: [{'name', 'version', 'state', 'reason'}, ...]."""
        return self.json("/v2/repository/index", b"{}")

    def config(self, model: str, version: str | None = None) -> dict:
        """The served config of `model` as Triton's JSON (model_config.proto field names)."""
        return self.json(f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/config")

    def load(self, model: str, config: dict | None = None, files: dict[str, bytes] | None = None) -> tuple[int, str]:
        """Load or reload `model`: from the repository, or with `config` (JSON) and `files` ({'<version>/<name>':
        bytes}) instead of the repository's. (HTTP status, Triton's error message or '')."""
        parameters = {"config": json.dumps(config)} if config else {}
        if files and self.marker:
            version = next(iter(files)).split("/", 1)[0]
            files = {**files, f"{version}/{MARKER}": self.marker.encode()}
        parameters.update({f"file:{path}": base64.b64encode(data).decode() for path, data in (files or {}).items()})
        body = {"parameters": parameters} if parameters else {}
        status, data = self.call(f"/v2/repository/models/{model}/load", json.dumps(body).encode(), LOAD_TIMEOUT)
        try:
            message = json.loads(data).get("error", "") if data else ""
        except ValueError:
            message = data.decode(errors="replace")
        return status, message

    def unload(self, model: str) -> None:
        self.call(f"/v2/repository/models/{model}/unload", b"{}")

    def ready_versions(self) -> dict[str, set[str]]:
        """Model name -> versions READY now."""
        return ready_versions(self.index())

    def reload_lost(self, before: dict[str, set[str]]) -> None:
        """Load again any model that was READY before a reload and is not now (e.g. the ensemble, which Triton
        takes down when a composing model reloads)."""
        now = self.ready_versions()
        for model in sorted(set(before) - set(now)):
            status, message = self.load(model)
            log.info("model '%s' was no longer ready after a reload; loading it: HTTP %s %s", model, status,
                     message[:300])


def ready_versions(index: list[dict]) -> dict[str, set[str]]:
    """Model name -> versions READY in a repository index."""
    out: dict[str, set[str]] = {}
    for entry in index:
        if entry.get("state") == "READY":
            out.setdefault(entry["name"], set()).add(str(entry.get("version", "")))
    return out
