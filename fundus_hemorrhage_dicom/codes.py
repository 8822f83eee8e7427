"""Codes and UIDs of the DICOM outputs, said once.

Standard codes where DICOM has one (DCM: PS3.16 Annex D; SCT: SNOMED CT as PS3.16 lists it; UCUM units); a
private scheme, designator `PRIVATE_SCHEME` ("99FHSEG": PS3.16 8.2 reserves the "99" prefix for private
schemes), for what no standard code names: the ETDRS subfields and retinal quadrants of one photo, the 4-2-1
haemorrhage criterion, distances in disc diameters, the image-quality verdict and its reasons, the laterality
check. docs/dicom.md lists every private code; `PRIVATE_CODES` is that list.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from fundus_hemorrhage.retinal_frame import ETDRS_SUBFIELDS, RETINAL_QUADRANTS

OP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
OP_SOP_CLASSES = {OP_SOP_CLASS, "1.2.840.10008.5.1.4.1.1.77.1.5.2"}  # and 16 Bit
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage: the overlay
# a single-frame IOD highdicom knows, lent to the OP source while the SEG is built (seg.py: the OP workaround)
VL_PHOTOGRAPHIC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.4"

PRIVATE_SCHEME = "99FHSEG"
PRIVATE_SCHEME_NAME = "fundus_hemorrhage private codes"
PRIVATE_SCHEME_RESPONSIBLE = "fundus_hemorrhage project (docs/dicom.md)"

MANUFACTURER = "fundus_hemorrhage"  # Manufacturer of every instance the gateway writes: how it knows its own


def private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


# Standard codes
HEMORRHAGE = codes.SCT.Hemorrhage  # SCT 50960005
ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003, CID 7150 segment category
RETINA = codes.SCT.Retina  # SCT 5665001
EYE = codes.SCT.Eye  # SCT 81745001
RIGHT, LEFT = codes.SCT.Right, codes.SCT.Left  # SCT 24028007, 7771000 (laterality modifiers, CID 244)
YES, NO = codes.SCT.Yes, codes.SCT.No  # SCT 373066001, 373067005
AREA = codes.SCT.Area  # SCT 42798000
NUMBER_OF_LESIONS = codes.SCT.NumberOfLesions  # SCT 246206008
IMAGE_QUALITY = codes.DCM.ImageQuality  # DCM 111101
THRESHOLD_VALUE = codes.DCM.ThresholdValue  # DCM 122411
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence  # DCM 123110 (CID 7162 algorithm family)

# UCUM units
MM2 = CodedConcept("mm2", "UCUM", "square millimeter")
LESIONS_UNIT = CodedConcept("{lesions}", "UCUM", "lesions")
QUADRANTS_UNIT = CodedConcept("{quadrants}", "UCUM", "quadrants")
DISC_DIAMETERS = CodedConcept("{disc diameters}", "UCUM", "disc diameters")
UM_PER_PIXEL = CodedConcept("um/{pixel}", "UCUM", "micrometer per pixel")
NO_UNITS = CodedConcept("1", "UCUM", "no units")

# Private codes
PROCEDURE = private("FH0001", "Colour fundus photograph haemorrhage analysis")
ETDRS_SUBFIELD = private("FH0010", "ETDRS grid subfield")
RETINAL_QUADRANT = private("FH0011", "Retinal quadrant")
DISTANCE_TO_FOVEA = private("FH0012", "Distance from the fovea centre to the lesion's nearest pixel")
LESIONS_WITHIN_1DD = private("FH0013", "Lesions within 1 disc diameter of the fovea")
QUADRANTS_WITH_HEMORRHAGE = private("FH0014", "Retinal quadrants with haemorrhage")
QUADRANTS_WITH_20 = private("FH0015", "Retinal quadrants with 20 or more haemorrhages")
RULE_4_2_1 = private("FH0016", "Haemorrhage criterion of the 4-2-1 rule met")
DETECTED_EYE = private("FH0017", "Eye detected in the photograph")
LATERALITY_CHECK = private("FH0018", "ImageLaterality against the detected eye")
SCALE = private("FH0019", "Photo scale, assuming a disc diameter of 1800 um")
UNGRADABLE_REASON = private("FH0020", "Reason the photograph is ungradable")
GRADABLE = private("FH0030", "Gradable")
UNGRADABLE = private("FH0031", "Ungradable")
UNKNOWN_EYE = private("FH0032", "Eye not determined")
LATERALITY_AGREES = private("FH0033", "ImageLaterality agrees with the detected eye")
LATERALITY_DISAGREES = private("FH0034", "ImageLaterality disagrees with the detected eye: check the label")
LATERALITY_NOT_CHECKED = private("FH0035", "Not checked: ImageLaterality absent or eye not determined")

SUBFIELD_CODES = {name: private(f"FH01{i:02d}", f"ETDRS {name.replace('_', ' ')}")
                  for i, name in enumerate(ETDRS_SUBFIELDS)}
QUADRANT_CODES = {name: private(f"FH02{i:02d}", name) for i, name in enumerate(RETINAL_QUADRANTS)}
# the image-quality gate's reasons (fundus_hemorrhage.quality; README, Image quality)
QUALITY_REASONS = ("not a colour photograph", "red-free photograph", "under-exposed", "over-exposed", "washed out",
                   "uneven illumination", "out of focus", "heavily compressed")
REASON_CODES = {name: private(f"FH03{i:02d}", name) for i, name in enumerate(QUALITY_REASONS)}
OTHER_REASON = private("FH0399", "other reason")

PRIVATE_CODES = [v for v in globals().values() if isinstance(v, CodedConcept) and v.scheme_designator ==
                 PRIVATE_SCHEME] + [*SUBFIELD_CODES.values(), *QUADRANT_CODES.values(), *REASON_CODES.values()]
