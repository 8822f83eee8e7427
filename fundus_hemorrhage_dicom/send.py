"""Sending photos to the PACS as a camera does (C-STORE with pynetdicom, STOW-RS), and finding what the gateway
stored in a study: for the tests, the benchmark, and trying out an installation.

    c_store([ds, ...], 4242, aet="HEMOSEG")        -> [0, ...] (DIMSE status per instance)
    stow_rs([ds, ...], "http://127.0.0.1:8042/dicom-web")
    outputs_of("http://127.0.0.1:8042", study_uid)  -> the gateway's instances in the study
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import requests
from pydicom.dataset import Dataset

from .camera import to_bytes
from .codes import MANUFACTURER


def c_store(datasets: list[Dataset], port: int, aet: str = "HEMOSEG", calling: str = "FUNDUSCAM") -> list[int]:
    """C-STORE each dataset over one association (pynetdicom); the status of each."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise RuntimeError(f"association with {aet}@127.0.0.1:{port} not established")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def stow_rs(datasets: list[Dataset], dicomweb_url: str) -> requests.Response:
    """STOW-RS of the datasets as one multipart/related request (PS3.18 10.5)."""
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(ds) + b"\r\n"
                    for ds in datasets) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    return requests.post(f"{dicomweb_url}/studies", data=body, headers=headers, timeout=120)


def study_ids(orthanc_url: str, study_uid: str) -> list[str]:
    """Orthanc's identifiers of the study with this Study Instance UID (one, or none)."""
    found = requests.post(f"{orthanc_url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID":
                                                                                          study_uid}}, timeout=30)
    found.raise_for_status()
    return found.json()


def study_instances(orthanc_url: str, study_uid: str) -> list[dict]:
    """Every instance of the study (Orthanc's expanded instance objects with their series' main tags)."""
    out = []
    for study_id in study_ids(orthanc_url, study_uid):
        for series in requests.get(f"{orthanc_url}/studies/{study_id}/series", timeout=30).json():
            for instance in requests.get(f"{orthanc_url}/series/{series['ID']}/instances", timeout=30).json():
                out.append(dict(instance, series_tags=series["MainDicomTags"]))
    return out


def outputs_of(orthanc_url: str, study_uid: str) -> list[dict]:
    """The instances of the study that the gateway wrote (Manufacturer fundus_hemorrhage)."""
    return [i for i in study_instances(orthanc_url, study_uid) if i["series_tags"].get("Manufacturer") ==
            MANUFACTURER]


def wait_for_outputs(orthanc_url: str, study_uid: str, count: int, timeout: float = 120.0,
                     check: Callable[[], None] | None = None) -> list[dict]:
    """The gateway's instances in the study once there are at least `count`; TimeoutError after `timeout`
    seconds. `check` is called at each poll and may raise to stop early (e.g. the gateway has exited)."""
    deadline = time.monotonic() + timeout
    found: list[dict] = []
    while time.monotonic() < deadline:
        found = outputs_of(orthanc_url, study_uid)
        if len(found) >= count:
            return found
        if check is not None:
            check()
        time.sleep(0.25)
    raise TimeoutError(f"{len(found)} of {count} outputs in study {study_uid} after {timeout:.0f} s")
