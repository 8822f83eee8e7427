"""The overlay as a Secondary Capture image, for PACS viewers that do not display SEG: the photo with the lesions
outlined by ETDRS zone, the ETDRS grid, disc, fovea and legend (fundus_hemorrhage.overlay.draw_overlay, the same
picture segment.py writes), plus a banner line when ImageLaterality disagrees with the detected eye.

Stored JPEG Baseline (YBR_FULL_422, quality 95: highdicom's encoder, Pillow): a full-size RGB overlay of a 4288 x 2848
photo would be 37 MB uncompressed. BurnedInAnnotation YES (the legend is text on the pixels).
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit

from fundus_hemorrhage.overlay import draw_overlay

from . import codes as c
from .ids import output_uid


def banner(image: np.ndarray, text: str) -> None:
    """`text` in red on a dark band along the bottom of the BGR `image` (in place)."""
    scale = max(0.6, image.shape[1] / 2500)
    thickness = max(1, int(round(scale * 2)))
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    y1 = image.shape[0] - 4
    band = image[max(0, y1 - 2 * h):y1, :]
    band[:] = (band * 0.3).astype(np.uint8)
    cv2.putText(image, text, (8, y1 - h // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (60, 60, 255), thickness,
                cv2.LINE_AA)


def overlay_pixels(rgb: np.ndarray, mask: np.ndarray, report: dict, warning: str | None = None) -> np.ndarray:
    """RGB overlay (H x W x 3 uint8) of the RGB photo, its bool mask and report; `warning` as a banner."""
    bgr = draw_overlay(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), mask.astype(np.uint8) * 255, report)
    if warning:
        banner(bgr, warning)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def build_overlay(source: Dataset, pixels: np.ndarray, model_version: str, software_version: str) -> hd.sc.SCImage:
    """Secondary Capture of the RGB `pixels` (overlay_pixels) in the photo's study, referencing the photo."""
    orientation = tuple(getattr(source, "PatientOrientation", None) or ())
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="YBR_FULL_422", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=output_uid("overlay-series", source.StudyInstanceUID,
                                                                    model_version),
        series_number=903, sop_instance_uid=output_uid("overlay", source.SOPInstanceUID, model_version),
        instance_number=int(getattr(source, "InstanceNumber", 1) or 1), manufacturer=c.MANUFACTURER,
        patient_orientation=orientation if len(orientation) == 2 else ("L", "F"),
        laterality=str(source.ImageLaterality) if getattr(source, "ImageLaterality", None) in ("R", "L") else None,
        transfer_syntax_uid=JPEGBaseline8Bit, series_description=f"Haemorrhage overlay (unet v{model_version})",
        software_versions=software_version)
    sc.BurnedInAnnotation = "YES"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = "lesion outlines, ETDRS grid and legend drawn over the source photograph"
    return sc
