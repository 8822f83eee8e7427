"""Deterministic UIDs of the gateway's outputs: the same source photo and model version always give the same
SEG, SR and overlay UIDs, so a result stored twice (a restart, a retry) is the same instance, which Orthanc
keeps once (it does not overwrite: "OverwriteInstances" false).

pydicom's generate_uid with entropy sources: the UID is the prefix + an integer from the SHA-512 of the sources
(pydicom.uid.generate_uid; 2.25-style UUID derivation otherwise). The prefix is pydicom's implementation root.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

KINDS = ("seg", "sr", "overlay", "seg-series", "sr-series", "overlay-series")


def output_uid(kind: str, source_uid: str, model_version: str) -> str:
    """UID of output `kind` (KINDS) for the photo `source_uid` segmented by unet `model_version`. A series UID
    ("*-series") is per study and version: pass the Study Instance UID as `source_uid`."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    return generate_uid(entropy_srcs=["fundus_hemorrhage", kind, str(source_uid), str(model_version)])


def derived_uid(*parts) -> str:
    """A UID determined by `parts` (e.g. the SR's tracking UIDs: ("lesion", seg_uid, lesion id))."""
    return generate_uid(entropy_srcs=["fundus_hemorrhage", *map(str, parts)])
