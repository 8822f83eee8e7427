"""What the gateway stores for one photo, from the ensemble's answer: SEG + SR + overlay for a segmented photo,
the SR alone for an ungradable one (it says so and why), nothing for a photo the service could not read.
Pure: datasets in, datasets out; no network."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from importlib import metadata

from pydicom.dataset import Dataset

from fundus_hemorrhage.report import PhotoResult

from .codes import LATERALITY_DISAGREES
from .capture import build_overlay, overlay_pixels
from .seg import build_seg, mask_from_png
from .source import SourcePhoto
from .sr import build_sr, laterality_check

log = logging.getLogger(__name__)


def software_version() -> str:
    try:
        return metadata.version("fundus-hemorrhage")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class PhotoOutputs:
    """The datasets to store for one photo (SEG, SR, overlay in that order, those that apply), the model version
    that made them, and `notes` (one-line remarks for the log, e.g. a laterality disagreement)."""
    datasets: list[Dataset]
    model_version: str
    notes: list[str] = field(default_factory=list)


class ServiceRefused(Exception):
    """The service answered the photo with an error (it could not read it): no outputs; str(exc) says why."""


def outputs_for(photo: SourcePhoto, result: PhotoResult, version: str | None = None) -> PhotoOutputs:
    """SEG/SR/overlay for `photo` from its `result`. Raises ServiceRefused for an error report."""
    version = version or software_version()
    report = result.report
    if result.status == "error":
        raise ServiceRefused(f"the service could not segment it: {result.error}")
    model_version = str((report.get("model") or {}).get("version", "?"))
    source = photo.dataset
    if result.status == "ungradable":
        sr = build_sr(source, report, None, version)
        return PhotoOutputs([sr], model_version, [result.error])
    mask = mask_from_png(result.mask_png, (int(source.Rows), int(source.Columns)))
    seg = build_seg(source, mask, model_version, float(report["threshold"]), version)
    sr = build_sr(source, report, seg, version)
    code, text = laterality_check(photo.laterality, report)
    warning = text if code == LATERALITY_DISAGREES else None
    overlay = build_overlay(source, overlay_pixels(photo.rgb, mask, report, warning), model_version, version)
    return PhotoOutputs([seg, sr, overlay], model_version, [text] if warning else [])


def to_part10(ds: Dataset) -> bytes:
    """A highdicom dataset as a DICOM file (file meta from its transfer syntax)."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()

