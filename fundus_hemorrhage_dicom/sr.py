"""Comprehensive SR, TID 1500 Measurement Report, of one OP photo's lesion report (schema 2.0), with highdicom.

    Measurement Report (TID 1500), procedure: 99FHSEG FH0001, observer: this gateway (device)
      photo group (TID 1501): tracking id, finding Hemorrhage (SCT 50960005) at Retina (SCT 5665001) with the
        DICOM ImageLaterality, algorithm = unet + version, parameters threshold and min_lesion_area_px,
        the source photo (Source Image for Measurement Group)
        measurements: Number of lesions (SCT 246206008), Area (SCT 42798000, mm2, the total), Threshold Value
          (DCM 122411), lesions within 1 DD of the fovea, retinal quadrants with haemorrhage / with 20 or more,
          the scale (um per pixel; 1 disc diameter = 1800 um assumed)
        qualitative: Image Quality (DCM 111101) gradable/ungradable and each reason, the 4-2-1 haemorrhage
          criterion met (SCT Yes/No), the eye detected, ImageLaterality agrees / disagrees / not checked
      per lesion (TID 1410): tracking id "lesion N", the SEG's segment 1 frame 1 over the photo, Area (mm2, or
        pixels without a scale), distance to the fovea (disc diameters), ETDRS subfield, retinal quadrant

An ungradable photo gets the photo group only: its quality verdict, the reasons, the algorithm; no counts (an
empty mask is not "no lesions") and no SEG to reference. Private concepts: fundus_hemorrhage_dicom.codes.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import (AlgorithmIdentification, FindingSite, Measurement, MeasurementReport,
                          MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                          PlanarROIMeasurementsAndQualitativeEvaluations, QualitativeEvaluation,
                          ReferencedSegmentationFrame, SourceImageForMeasurementGroup, SourceImageForSegmentation,
                          TrackingIdentifier)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from . import codes as c
from .ids import derived_uid, output_uid

PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "pixels")
EYES = {"right": c.RIGHT, "left": c.LEFT}


def laterality_check(dicom_laterality: str | None, report: dict) -> tuple[hd.sr.CodedConcept, str]:
    """(code, one-line text) of the ImageLaterality check: "R"/"L" against the report's eye.laterality."""
    detected = (report.get("eye") or {}).get("laterality", "unknown")
    if dicom_laterality not in ("R", "L") or detected not in EYES:
        return c.LATERALITY_NOT_CHECKED, f"not checked (ImageLaterality {dicom_laterality or 'absent'}, " \
                                         f"detected eye {detected})"
    labelled = "right" if dicom_laterality == "R" else "left"
    if labelled == detected:
        return c.LATERALITY_AGREES, f"ImageLaterality {dicom_laterality} agrees with the detected {detected} eye"
    return c.LATERALITY_DISAGREES, (f"ImageLaterality {dicom_laterality} ({labelled} eye) but the photo shows a "
                                    f"{detected} eye: check the label")


def algorithm_id(report: dict) -> AlgorithmIdentification:
    model = report.get("model") or {}
    return AlgorithmIdentification(name=f"fundus_hemorrhage {model.get('name', 'unet')}",
                                   version=str(model.get("version", "?")),
                                   parameters=[f"threshold={report.get('threshold')}",
                                               f"min_lesion_area_px={report.get('min_lesion_area_px')}"])


def _count(name, value, unit=c.LESIONS_UNIT) -> Measurement:
    return Measurement(name=name, value=float(value), unit=unit)


def photo_group(source: Dataset, report: dict, tracking_uid: str) -> MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of the whole photo (see the module docstring)."""
    gradable = report.get("status") == "ok"
    quality = report.get("image_quality") or {}
    qualitative = [QualitativeEvaluation(c.IMAGE_QUALITY, c.GRADABLE if gradable else c.UNGRADABLE)]
    qualitative += [QualitativeEvaluation(c.UNGRADABLE_REASON, c.REASON_CODES.get(r, c.OTHER_REASON))
                    for r in quality.get("reasons") or []]
    measurements = []
    if gradable:
        totals, findings, scale = report["totals"], report.get("findings"), report.get("scale")
        measurements.append(_count(c.NUMBER_OF_LESIONS, totals["count"]))
        if scale:
            area = sum(les["area_mm2"] for les in report["lesions"])
            measurements.append(Measurement(name=c.AREA, value=round(area, 6), unit=c.MM2))
            measurements.append(Measurement(name=c.SCALE, value=scale["um_per_px"], unit=c.UM_PER_PIXEL))
        if findings:
            measurements += [
                _count(c.LESIONS_WITHIN_1DD, findings["lesions_within_1dd_of_fovea"]["count"]),
                _count(c.QUADRANTS_WITH_HEMORRHAGE, findings["quadrants_with_hemorrhage"], c.QUADRANTS_UNIT),
                _count(c.QUADRANTS_WITH_20, findings["quadrants_with_20_or_more"], c.QUADRANTS_UNIT)]
            qualitative.append(QualitativeEvaluation(
                c.RULE_4_2_1, c.YES if findings["rule_4_2_1_hemorrhage_criterion_met"] else c.NO))
        eye = (report.get("eye") or {}).get("laterality", "unknown")
        qualitative.append(QualitativeEvaluation(c.DETECTED_EYE, EYES.get(eye, c.UNKNOWN_EYE)))
        qualitative.append(QualitativeEvaluation(c.LATERALITY_CHECK,
                                                 laterality_check(_laterality(source), report)[0]))
    measurements.append(Measurement(name=c.THRESHOLD_VALUE, value=float(report["threshold"]), unit=c.NO_UNITS))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=f"photo {source.SOPInstanceUID}"),
        finding_type=c.HEMORRHAGE, algorithm_id=algorithm_id(report), finding_sites=[_site(source)],
        measurements=measurements, qualitative_evaluations=qualitative,
        source_images=[SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)])


def _laterality(source: Dataset) -> str | None:
    value = str(getattr(source, "ImageLaterality", "") or getattr(source, "Laterality", "") or "")
    return value if value in ("R", "L") else None


def _site(source: Dataset) -> FindingSite:
    side = {"R": c.RIGHT, "L": c.LEFT}.get(_laterality(source) or "")
    return FindingSite(anatomic_location=c.RETINA, laterality=side)


def lesion_groups(source: Dataset, report: dict, seg_uid: str) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per lesion of the report, referencing segment 1 of the SEG `seg_uid`."""
    segment = ReferencedSegmentationFrame(
        sop_class_uid=c.SEG_SOP_CLASS, sop_instance_uid=seg_uid, frame_number=1, segment_number=1,
        source_image=SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID))
    groups = []
    for les in report.get("lesions") or []:
        if les.get("area_mm2") is not None:
            measurements = [Measurement(name=c.AREA, value=float(les["area_mm2"]), unit=c.MM2)]
        else:
            measurements = [Measurement(name=c.AREA, value=float(les["area_px"]), unit=PIXELS)]
        if les.get("distance_to_fovea_dd") is not None:
            measurements.append(Measurement(name=c.DISTANCE_TO_FOVEA, value=float(les["distance_to_fovea_dd"]),
                                            unit=c.DISC_DIAMETERS))
        qualitative = []
        if les.get("etdrs_subfield"):
            qualitative.append(QualitativeEvaluation(c.ETDRS_SUBFIELD, c.SUBFIELD_CODES[les["etdrs_subfield"]]))
        if les.get("retinal_quadrant"):
            qualitative.append(QualitativeEvaluation(c.RETINAL_QUADRANT,
                                                     c.QUADRANT_CODES[les["retinal_quadrant"]]))
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=derived_uid("lesion", seg_uid, les["id"]),
                                                   identifier=f"lesion {les['id']}"),
            referenced_segment=segment, finding_type=c.HEMORRHAGE, algorithm_id=algorithm_id(report),
            finding_sites=[_site(source)], measurements=measurements, qualitative_evaluations=qualitative or None))
    return groups


def drop_segment_number_beside_frame(item: Dataset) -> None:
    """PS3.3 Table 10-3 (Image SOP Instance Reference Macro): Referenced Segment Number only where no Referenced
    Frame Number is given (dciodvfy: "Shall not be present when ReferencedFrameNumber is present"). highdicom's
    ReferencedSegmentationFrame writes both; with one segment in the SEG, frame 1 is segment 1."""
    for ref in getattr(item, "ReferencedSOPSequence", []):
        if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
            del ref.ReferencedSegmentNumber
    for child in getattr(item, "ContentSequence", []):
        drop_segment_number_beside_frame(child)


def build_sr(source: Dataset, report: dict, seg: Dataset | None, software_version: str) -> hd.sr.ComprehensiveSR:
    """The SR of `source` (the OP photo's metadata) from its served `report`; `seg` its SEG (None for an
    ungradable photo). UIDs from ids.output_uid with the report's model version."""
    version = str((report.get("model") or {}).get("version", "?"))
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("observer", c.MANUFACTURER, version), name="fundus_hemorrhage DICOM gateway",
            manufacturer_name=c.MANUFACTURER, model_name=f"unet v{version}"))
    groups: list = [photo_group(source, report, derived_uid("photo", source.SOPInstanceUID, version))]
    if seg is not None:
        groups += lesion_groups(source, report, str(seg.SOPInstanceUID))
    content = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                                procedure_reported=c.PROCEDURE, imaging_measurements=groups)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source] + ([seg] if seg is not None else []), content=content[0],
        series_instance_uid=output_uid("sr-series", source.StudyInstanceUID, version), series_number=902,
        sop_instance_uid=output_uid("sr", source.SOPInstanceUID, version),
        instance_number=int(getattr(source, "InstanceNumber", 1) or 1), manufacturer=c.MANUFACTURER,
        is_complete=True, series_description=f"Haemorrhage report (unet v{version})",
        software_versions=software_version)
    drop_segment_number_beside_frame(sr)
    scheme = Dataset()
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = c.PRIVATE_SCHEME, c.PRIVATE_SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = c.PRIVATE_SCHEME_RESPONSIBLE
    sr.CodingSchemeIdentificationSequence = list(getattr(sr, "CodingSchemeIdentificationSequence", [])) + [scheme]
    return sr
