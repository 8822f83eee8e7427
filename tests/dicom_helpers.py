"""Helpers of the DICOM gateway tests: the bad files of issue 21 item 4, the gateway as a process, waiting for its
outputs, dciodvfy (sending and finding outputs: fundus_hemorrhage_dicom.send)."""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import requests
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fundus_hemorrhage_dicom.camera import Study, op_from_jpeg, resized_jpeg, to_bytes
from fundus_hemorrhage_dicom import send
from fundus_hemorrhage_dicom.pacs import gateway_process, stop_process

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO_ROOT / "samples").glob("IDRiD_*[0-9].jpg"))
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def sample_jpeg(index: int = 0, width: int | None = None) -> bytes:
    data = SAMPLES[index % len(SAMPLES)].read_bytes()
    return resized_jpeg(data, width) if width else data


# -- the bad inputs of issue 21 item 4
def monochrome_op(study: Study, jpeg: bytes) -> Dataset:
    ds = op_from_jpeg(jpeg, study, transfer_syntax="explicit", instance_number=11)
    grey = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PresentationLUTShape = 1, "MONOCHROME2", "IDENTITY"
    del ds.PlanarConfiguration
    ds.PixelData = grey.tobytes()
    return ds


def multiframe_op(study: Study, jpeg: bytes) -> Dataset:
    """A stereo pair as two frames of one OP instance."""
    ds = op_from_jpeg(jpeg, study, transfer_syntax="explicit", instance_number=12)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return ds


def op_without_pixels(study: Study, jpeg: bytes) -> Dataset:
    ds = op_from_jpeg(jpeg, study, transfer_syntax="explicit", instance_number=13)
    del ds.PixelData
    return ds


def op_truncated_jpeg(study: Study, jpeg: bytes) -> Dataset:
    """The camera's JPEG cut to 40 %, in an otherwise complete file (a write that failed half-way)."""
    return op_from_jpeg(jpeg[: int(len(jpeg) * 0.4)], study, instance_number=14)


def grey_colour_op(study: Study, jpeg: bytes) -> Dataset:
    """An RGB photo with no colour in it: the quality gate calls it ungradable ("not a colour photograph")."""
    grey = Image.open(io.BytesIO(jpeg)).convert("L").convert("RGB")
    out = io.BytesIO()
    grey.save(out, "JPEG", quality=92)
    return op_from_jpeg(out.getvalue(), study, instance_number=15)


def ct_image(study: Study) -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.StudyInstanceUID = study.patient_name, study.patient_id, study.study_uid
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), "CT", 5, 1
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = study.when.strftime("%Y%m%d"), "093000", study.accession
    ds.ImageType, ds.Rows, ds.Columns = ["ORIGINAL", "PRIMARY", "AXIAL"], 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.full((64, 64), 1024, np.uint16).tobytes()
    return ds


# -- the gateway as a process
@dataclass
class GatewayProcess:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def start_gateway(orthanc_url: str, triton_url: str, state_dir: Path, log_path: Path) -> GatewayProcess:
    return GatewayProcess(gateway_process(orthanc_url, triton_url, state_dir, log_path), log_path)


def wait_for_outputs(orthanc_url: str, study_uid: str, count: int, timeout: float = 120.0,
                     gateway: GatewayProcess | None = None) -> list[dict]:
    """send.wait_for_outputs, failing at once with the gateway's log when the gateway has exited, and with the
    log's tail on a time-out."""
    def alive():
        if gateway is not None and gateway.process.poll() is not None:
            raise AssertionError(f"the gateway exited ({gateway.process.returncode}):\n{gateway.log()[-3000:]}")
    try:
        return send.wait_for_outputs(orthanc_url, study_uid, count, timeout, alive)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{gateway.log()[-3000:] if gateway else ''}") from None


def download(orthanc_url: str, instance_id: str) -> Dataset:
    return pydicom.dcmread(io.BytesIO(requests.get(f"{orthanc_url}/instances/{instance_id}/file",
                                                   timeout=60).content))


def new_study(**kwargs) -> Study:
    return Study(study_uid=generate_uid(), series_uid=generate_uid(), **kwargs)


def dciodvfy_errors(ds: Dataset, folder: Path) -> list[str]:
    """The "Error" lines dciodvfy (dicom3tools) prints for the dataset, written to a file in `folder`."""
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(to_bytes(ds))
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
