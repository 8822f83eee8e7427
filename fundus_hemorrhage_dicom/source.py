"""An Ophthalmic Photography instance as the gateway reads it: checked, decoded, and the bytes to send to the
ensemble; or refused with a reason (`Refused`), which the gateway logs with the instance and skips.

Accepted (README, DICOM gateway): OP 8-bit, one frame, 3 samples, RGB / YBR_FULL_422 / YBR_FULL, in JPEG Baseline
(1.2.840.10008.1.2.4.50) or uncompressed (Implicit/Explicit VR Little Endian) transfer syntax. A JPEG Baseline
YCbCr frame is sent to the ensemble as it is (it is the camera's own JPEG stream, decoded as the service decodes
any JPEG); any other pixels are sent as a lossless PNG of the decoded RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from .codes import OP_SOP_CLASSES

ACCEPTED_TRANSFER_SYNTAXES = {JPEGBaseline8Bit: "JPEG Baseline", ExplicitVRLittleEndian: "Explicit VR Little Endian",
                              ImplicitVRLittleEndian: "Implicit VR Little Endian"}
COLOUR_PHOTOMETRICS = {"RGB", "YBR_FULL_422", "YBR_FULL"}


class Refused(Exception):
    """This instance is not processed; str(exc) is the reason, one line."""


@dataclass
class SourcePhoto:
    """One accepted photo: `dataset` (everything but PixelData), `rgb` (H x W x 3 uint8, as stored), `image_bytes`
    (what the ensemble is sent), `laterality` ("R", "L" or None: ImageLaterality, else the series' Laterality)."""
    dataset: Dataset
    rgb: np.ndarray
    image_bytes: bytes
    laterality: str | None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def describe(ds: Dataset) -> str:
    """A one-line name of the instance for logs: SOP Instance UID and the modality."""
    return f"instance {getattr(ds, 'SOPInstanceUID', '?')} ({getattr(ds, 'Modality', '?')})"


def check_kind(ds: Dataset) -> None:
    """Refused unless `ds` (metadata is enough) is a single-frame colour OP photo in an accepted transfer syntax."""
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    modality = str(getattr(ds, "Modality", ""))
    if sop_class not in OP_SOP_CLASSES or modality != "OP":
        raise Refused(f"not an ophthalmic photograph (modality {modality or '?'}, SOP class {sop_class or '?'})")
    if sop_class != "1.2.840.10008.5.1.4.1.1.77.1.5.1":
        raise Refused("16-bit ophthalmic photographs are not supported")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames != 1:
        raise Refused(f"multi-frame photograph ({frames} frames, e.g. a stereo pair): one frame expected")
    photometric = str(getattr(ds, "PhotometricInterpretation", ""))
    if photometric.startswith("MONOCHROME") or int(getattr(ds, "SamplesPerPixel", 3)) == 1:
        raise Refused(f"monochrome photograph ({photometric or '1 sample per pixel'}): the model needs colour")
    if photometric not in COLOUR_PHOTOMETRICS or int(getattr(ds, "SamplesPerPixel", 0)) != 3:
        raise Refused(f"photometric interpretation {photometric or '?'} is not supported")
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in ACCEPTED_TRANSFER_SYNTAXES:
        raise Refused(f"transfer syntax {ts or '?'} is not supported (JPEG Baseline or uncompressed)")
    if int(getattr(ds, "BitsAllocated", 8)) != 8:
        raise Refused(f"{ds.BitsAllocated} bits allocated: 8 expected")


def read_photo(data: bytes) -> SourcePhoto:
    """Parses, checks (`check_kind`) and decodes a DICOM Part 10 file. Raises Refused with the reason."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise Refused(f"not a readable DICOM file: {' '.join(str(exc).split())[:200]}") from None
    if "SOPClassUID" not in ds:  # pydicom gives an empty dataset for a file cut inside its pixel data
        raise Refused("not a readable DICOM file: no SOP Class UID (truncated or empty)")
    try:
        check_kind(ds)
    except Refused:
        raise
    except Exception as exc:  # e.g. NumberOfFrames "abc": pydicom keeps the bad value, int() refuses it
        raise Refused(f"unreadable image attributes: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") \
            from None
    if "PixelData" not in ds:
        raise Refused("no pixel data")
    ts = str(ds.file_meta.TransferSyntaxUID)
    try:
        rgb = pydicom.pixels.pixel_array(ds, as_rgb=True)
    except Exception as exc:
        raise Refused(f"pixel data cannot be decoded ({ACCEPTED_TRANSFER_SYNTAXES[ts]}): "
                      f"{' '.join(str(exc).split())[:200]}") from None
    if rgb.shape != (ds.Rows, ds.Columns, 3) or rgb.dtype != np.uint8:
        raise Refused(f"decoded pixels are {rgb.shape} {rgb.dtype}, not {ds.Rows}x{ds.Columns}x3 uint8")
    if ts == JPEGBaseline8Bit and ds.PhotometricInterpretation != "RGB":
        image_bytes = next(generate_frames(ds.PixelData, number_of_frames=1))
        if image_bytes.endswith(b"\xff\xd9\x00"):  # the fragment's padding to even length (PS3.5 A.4)
            image_bytes = image_bytes[:-1]
    else:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        image_bytes = buf.tobytes()
    laterality = str(getattr(ds, "ImageLaterality", "") or getattr(ds, "Laterality", "") or "") or None
    del ds.PixelData
    return SourcePhoto(ds, np.ascontiguousarray(rgb), image_bytes, laterality if laterality in ("R", "L") else None)
