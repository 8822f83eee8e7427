"""The part of Orthanc's REST API (https://orthanc.uclouvain.be/book/users/rest.html) the gateway uses, with
requests: the /changes feed, studies, series, instance files, user metadata, storing an instance.

Every call that cannot reach Orthanc, or gets a 5xx, raises `OrthancUnavailable` (the gateway waits and retries:
Orthanc restarting is an outage, not an error of the study); a 404 of a resource gives None where it says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

RESULT_METADATA = "FundusHemorrhageResult"  # user metadata (deploy/orthanc/orthanc.json "UserMetadata")


class OrthancUnavailable(Exception):
    """Orthanc cannot be reached or answered 5xx; one line."""


class OrthancError(Exception):
    """Orthanc refused a request (4xx other than a 404 that the call expects)."""


@dataclass
class Change:
    seq: int
    change_type: str
    resource_type: str
    resource_id: str


class Orthanc:
    """REST client of the Orthanc at `url` (e.g. http://127.0.0.1:8042); `auth` (user, password) for HTTP basic
    authentication when Orthanc requires it; `timeout` seconds per request."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.auth = auth
        self.timeout = timeout

    def _request(self, method: str, path: str, missing_ok: bool = False, **kwargs) -> requests.Response | None:
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url}: {type(exc).__name__}: {str(exc)[:200]}") from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 500:
            raise OrthancUnavailable(f"Orthanc at {self.url}: {method} {path}: HTTP {response.status_code}")
        if response.status_code >= 400:
            raise OrthancError(f"Orthanc at {self.url}: {method} {path}: HTTP {response.status_code} "
                               f"{response.text[:200]}")
        return response

    def get_json(self, path: str, missing_ok: bool = False):
        response = self._request("GET", path, missing_ok)
        return None if response is None else response.json()

    def system(self) -> dict:
        return self.get_json("/system")

    def changes(self, since: int, limit: int = 100) -> tuple[list[Change], bool, int]:
        """(changes after `since`, Done, Last) of /changes."""
        page = self.get_json(f"/changes?since={int(since)}&limit={int(limit)}")
        changes = [Change(int(ch["Seq"]), ch["ChangeType"], ch["ResourceType"], ch["ID"]) for ch in page["Changes"]]
        return changes, bool(page["Done"]), int(page["Last"])

    def last_change(self) -> int:
        return int(self.get_json("/changes?last")["Last"])

    def study(self, study_id: str) -> dict | None:
        return self.get_json(f"/studies/{study_id}", missing_ok=True)

    def series(self, series_id: str) -> dict | None:
        return self.get_json(f"/series/{series_id}", missing_ok=True)

    def instance_file(self, instance_id: str) -> bytes | None:
        response = self._request("GET", f"/instances/{instance_id}/file", missing_ok=True)
        return None if response is None else response.content

    def instance_tags(self, instance_id: str) -> dict | None:
        """The instance's tags, simplified (keyword -> value), without the pixel data."""
        return self.get_json(f"/instances/{instance_id}/simplified-tags", missing_ok=True)

    def metadata(self, instance_id: str, name: str = RESULT_METADATA) -> str | None:
        response = self._request("GET", f"/instances/{instance_id}/metadata/{name}", missing_ok=True)
        return None if response is None else response.text

    def set_metadata(self, instance_id: str, value: str, name: str = RESULT_METADATA) -> None:
        self._request("PUT", f"/instances/{instance_id}/metadata/{name}", data=value.encode())

    def store(self, dicom: bytes) -> dict:
        """POST /instances; Orthanc's answer ({"ID", "Status": "Success" or "AlreadyStored", ...})."""
        return self._request("POST", "/instances", data=dicom,
                             headers={"Content-Type": "application/dicom"}).json()

    def lookup(self, uid: str) -> list[dict]:
        """The resources whose DICOM UID is `uid` (/tools/lookup)."""
        return self._request("POST", "/tools/lookup", data=uid.encode()).json()
