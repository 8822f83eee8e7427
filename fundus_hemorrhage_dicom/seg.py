"""DICOM Segmentation (SEG) of the haemorrhage mask of one OP photo, with highdicom.

The OP workaround: highdicom decides whether a source is "multi-frame" by its IOD (`is_multiframe_image`: the
IOD has NumberOfFrames), and the OP IOD has the Multi-frame module, so highdicom reads a single OP photo as an
enhanced multi-frame image and fails on its missing SharedFunctionalGroupsSequence (AttributeError). highdicom
is given instead a copy of the photo's metadata (no pixels) lent the SOP class of the single-frame VL
Photographic Image IOD, without NumberOfFrames; afterwards every reference to the photo in the SEG
(ReferencedSeriesSequence, the per-frame Source Image Sequence) gets the OP SOP class back. highdicom's
Segmentation then takes the path it has for single-frame sources without a frame of reference (highdicom#159,
#183: one frame, dimension index = segment number, no plane position or pixel measures).

The SEG also gets PatientOrientation from the photo: Type 2C in its General Image module, required when the
image has no frame of reference (dciodvfy reports it missing otherwise).
"""

from __future__ import annotations

import copy

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from . import codes as c
from .ids import output_uid


def mask_from_png(mask_png: bytes, shape: tuple[int, int]) -> np.ndarray:
    """The served MASK PNG (0/255) as a bool array; ValueError when it is not (rows, columns) = `shape`."""
    mask = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise ValueError("the served mask is not a grayscale PNG")
    if mask.shape != tuple(shape):
        raise ValueError(f"the served mask is {mask.shape[1]}x{mask.shape[0]}, the photo {shape[1]}x{shape[0]}")
    return mask > 0


def single_frame_stand_in(source: Dataset) -> Dataset:
    """The photo's metadata (no PixelData) as a single-frame VL Photographic image, for highdicom."""
    stand_in = Dataset()
    for element in source:
        if element.keyword not in ("PixelData", "NumberOfFrames", "FrameIncrementPointer"):
            stand_in.add(copy.deepcopy(element))
    stand_in.file_meta = copy.deepcopy(source.file_meta) if hasattr(source, "file_meta") else Dataset()
    stand_in.SOPClassUID = c.VL_PHOTOGRAPHIC_SOP_CLASS
    return stand_in


def restore_source_class(dataset: Dataset, source: Dataset) -> None:
    """Every item in `dataset`'s sequences (recursively) that references the photo gets its SOP class back."""
    for element in dataset:
        if element.VR != "SQ":
            continue
        for item in element.value:
            if getattr(item, "ReferencedSOPInstanceUID", None) == source.SOPInstanceUID:
                item.ReferencedSOPClassUID = source.SOPClassUID
            restore_source_class(item, source)


def algorithm(model_version: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name="fundus_hemorrhage unet", family=c.ARTIFICIAL_INTELLIGENCE,
                                              version=str(model_version))


def build_seg(source: Dataset, mask: np.ndarray, model_version: str, threshold: float,
              software_version: str) -> hd.seg.Segmentation:
    """BINARY SEG, one segment (haemorrhage: SCT 50960005, category SCT 49755003), of `mask` (bool, the photo's
    rows x columns) over the OP photo `source` (its metadata). UIDs from ids.output_uid. Raises ValueError
    when the mask's shape is not the photo's."""
    if mask.shape != (source.Rows, source.Columns):
        raise ValueError(f"mask {mask.shape} does not match the photo ({source.Rows}, {source.Columns})")
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="haemorrhage", segmented_property_category=c.ABNORMAL_STRUCTURE,
        segmented_property_type=c.HEMORRHAGE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm(model_version), anatomic_regions=[c.RETINA])
    seg = hd.seg.Segmentation(
        source_images=[single_frame_stand_in(source)], pixel_array=mask[np.newaxis].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=output_uid("seg-series", source.StudyInstanceUID, model_version), series_number=901,
        sop_instance_uid=output_uid("seg", source.SOPInstanceUID, model_version),
        instance_number=int(getattr(source, "InstanceNumber", 1) or 1), manufacturer=c.MANUFACTURER,
        manufacturer_model_name="haemorrhage segmentation (Triton ensemble)", software_versions=software_version,
        device_serial_number="1", series_description=f"Haemorrhage SEG (unet v{model_version}, "
                                                      f"threshold {threshold:g})",
        omit_empty_frames=False)  # an empty mask is a result too: keep its one frame
    restore_source_class(seg, source)
    seg.PatientOrientation = getattr(source, "PatientOrientation", None) or ""
    return seg
