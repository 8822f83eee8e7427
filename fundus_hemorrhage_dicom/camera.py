"""Synthetic but realistic Ophthalmic Photography (OP) files, as a fundus camera sends them, built with pydicom
from a colour JPEG photo (the repository's samples/*.jpg): for the tests, the benchmark and trying out a PACS.

    ds = op_from_jpeg(jpeg_bytes, study, laterality="L")                  # JPEG Baseline, YBR_FULL_422
    ds = op_from_jpeg(jpeg_bytes, study, transfer_syntax="explicit")      # uncompressed RGB, Explicit VR LE
    ds = op_from_jpeg(jpeg_bytes, study, transfer_syntax="implicit")      # uncompressed RGB, Implicit VR LE

The JPEG Baseline variant carries the camera's JPEG stream itself as the one encapsulated frame (as cameras do);
the uncompressed ones carry its decoded RGB pixels. Attributes follow the OP IOD (PS3.3 A.39.1): Multi-frame with
one frame, Ocular Region Imaged (ImageLaterality, the eye as Anatomic Region), the acquisition and photographic
parameter modules with their Type 2 attributes present (empty where a camera would not know), a camera-like
Manufacturer/model, AcquisitionDeviceTypeCode SRT R-1021A "Fundus Camera".
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID,
                         generate_uid)

from .codes import OP_SOP_CLASS

TRANSFER_SYNTAXES = {"jpeg": JPEGBaseline8Bit, "explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian}


@dataclass
class Study:
    """Patient and study identity shared by the photos of one visit."""
    patient_id: str = "FH-0001"
    patient_name: str = "Test^Fundus"
    accession: str = "A0001"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    when: dt.datetime = field(default_factory=lambda: dt.datetime(2026, 12, 1, 9, 30, 0))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def resized_jpeg(jpeg: bytes, width: int, quality: int = 90) -> bytes:
    """The photo scaled to `width` pixels across (aspect kept), re-encoded as baseline JPEG 4:2:0."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    height = round(image.height * width / image.width)
    out = io.BytesIO()
    image.resize((width, height), Image.LANCZOS).save(out, "JPEG", quality=quality, subsampling=2)
    return out.getvalue()


def op_from_jpeg(jpeg: bytes, study: Study, laterality: str = "L", instance_number: int = 1,
                 transfer_syntax: str = "jpeg", sop_instance_uid: str | None = None) -> Dataset:
    """An OP dataset (with file meta) of the photo `jpeg` (baseline JPEG bytes). `laterality`: "L" or "R"
    (ImageLaterality, and the value of PatientOrientation's row direction: PS3.3 C.8.17.2 leaves it to the
    camera). `transfer_syntax`: "jpeg", "explicit" or "implicit" (TRANSFER_SYNTAXES)."""
    image = Image.open(io.BytesIO(jpeg))
    if image.format != "JPEG" or image.mode != "RGB":
        raise ValueError(f"expected a colour JPEG photo, got {image.format} {image.mode}")
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    when = study.when + dt.timedelta(seconds=30 * instance_number)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = OP_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = OP_SOP_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    # Patient, General Study
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = study.patient_name, study.patient_id, \
        "19600101", "F"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study.study_uid, "1", study.accession
    ds.StudyDate, ds.StudyTime = study.when.strftime("%Y%m%d"), study.when.strftime("%H%M%S")
    ds.ReferringPhysicianName, ds.StudyDescription = "", "Fundus photography"
    # General Series, Ophthalmic Photography Series
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "OP", study.series_uid, 1
    ds.SeriesDescription = "Colour fundus 45 deg"
    # General Equipment, Enhanced General Equipment: what a camera writes
    ds.Manufacturer, ds.ManufacturerModelName = "Synthetic Optics", "FundusCam 45"
    ds.DeviceSerialNumber, ds.SoftwareVersions, ds.InstitutionName = "SN-0042", "2.1.0", "Test Eye Clinic"
    # General Image, Ophthalmic Photography Image
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ContentDate, ds.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.PatientOrientation = ["L" if laterality == "R" else "R", "F"] if laterality in ("L", "R") else ""
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    # Ocular Region Imaged
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = Sequence([_code("81745001", "SCT", "Eye")])
    # Multi-frame, Cine: one frame
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 0
    # Ophthalmic Photography Acquisition Parameters (Type 2: present, empty when unknown)
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = 45
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = "YES"
    ds.MydriaticAgentSequence = Sequence()
    ds.DegreeOfDilation = None
    ds.RefractiveStateSequence = Sequence()
    # Ophthalmic Photographic Parameters
    ds.AcquisitionDeviceTypeCodeSequence = Sequence([_code("R-1021A", "SRT", "Fundus Camera")])
    ds.IlluminationTypeCodeSequence = Sequence()
    ds.LightPathFilterTypeStackCodeSequence = Sequence()
    ds.ImagePathFilterTypeStackCodeSequence = Sequence()
    ds.LensesCodeSequence = Sequence()
    ds.DetectorType = "CMOS"
    # Acquisition Context
    ds.AcquisitionContextSequence = Sequence()
    # Image Pixel
    ds.Rows, ds.Columns = image.height, image.width
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 3, 8, 8, 7, 0
    ds.PlanarConfiguration = 0
    if ts == JPEGBaseline8Bit:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.LossyImageCompressionRatio = round(image.width * image.height * 3 / len(jpeg), 2)
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True  # encapsulated (PS3.5 A.4); pynetdicom writes it as it is
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"  # decoded from a JPEG
        ds.LossyImageCompressionRatio = round(image.width * image.height * 3 / len(jpeg), 2)
        ds.PixelData = np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes()
        ds["PixelData"].VR = "OB"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file, in its file meta's transfer syntax."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
