"""The gateway's DICOM files without servers: OP photos read as cameras send them, the bad ones refused with a
reason, the highdicom OP workaround, deterministic UIDs, the laterality check."""

from __future__ import annotations

import io
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_helpers import (ct_image, dciodvfy_errors, monochrome_op, multiframe_op, new_study, op_truncated_jpeg,
                           op_without_pixels, sample_jpeg)
from PIL import Image
from pydicom.sr.codedict import codes

from fundus_hemorrhage_dicom import codes as c
from fundus_hemorrhage_dicom import pacs
from fundus_hemorrhage_dicom.gateway import Gateway, Settings, State
from fundus_hemorrhage_dicom.camera import op_from_jpeg, to_bytes
from fundus_hemorrhage_dicom.ids import output_uid
from fundus_hemorrhage_dicom.seg import build_seg, single_frame_stand_in
from fundus_hemorrhage_dicom.source import Refused, read_photo
from fundus_hemorrhage_dicom.sr import laterality_check


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return sample_jpeg(0, 640)


@pytest.mark.parametrize("syntax", ["jpeg", "explicit", "implicit"])
def test_camera_photo_is_read_with_its_pixels(jpeg, syntax):
    ds = op_from_jpeg(jpeg, new_study(), laterality="R", transfer_syntax=syntax)
    photo = read_photo(to_bytes(ds))
    expected = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert photo.rgb.shape == expected.shape
    assert np.array_equal(photo.rgb, expected)  # same libjpeg decode, YBR_FULL_422 converted as PIL does
    assert photo.laterality == "R"
    if syntax == "jpeg":  # the camera's own stream goes to the ensemble
        assert photo.image_bytes == jpeg
    else:
        sent = np.asarray(Image.open(io.BytesIO(photo.image_bytes)).convert("RGB"))
        assert np.array_equal(sent, expected)  # lossless PNG of the stored pixels


@pytest.mark.parametrize("make, reason", [
    (lambda s, j: monochrome_op(s, j), "monochrome photograph"),
    (lambda s, j: multiframe_op(s, j), "multi-frame photograph (2 frames"),
    (lambda s, j: op_without_pixels(s, j), "no pixel data"),
    (lambda s, j: op_truncated_jpeg(s, j), "pixel data cannot be decoded (JPEG Baseline)"),
    (lambda s, j: ct_image(s), "not an ophthalmic photograph (modality CT"),
])
def test_bad_input_is_refused_with_its_reason(jpeg, make, reason):
    with pytest.raises(Refused, match=None) as refused:
        read_photo(to_bytes(make(new_study(), jpeg)))
    assert reason in str(refused.value)


def test_truncated_and_foreign_files_are_refused(jpeg):
    data = to_bytes(op_from_jpeg(jpeg, new_study()))
    with pytest.raises(Refused, match="not a readable DICOM file"):
        read_photo(data[: len(data) // 2])
    with pytest.raises(Refused, match="not a readable DICOM file"):
        read_photo(jpeg)  # a JPEG file is no DICOM file
    ds = op_from_jpeg(jpeg, new_study())
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000: not accepted (checked before decoding)
    with pytest.raises(Refused, match="transfer syntax 1.2.840.10008.1.2.4.90 is not supported"):
        read_photo(to_bytes(ds))


def _segment():
    return hd.seg.SegmentDescription(1, "haemorrhage", c.ABNORMAL_STRUCTURE, c.HEMORRHAGE,
                                     hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                     hd.AlgorithmIdentificationSequence("x", codes.DCM.ArtificialIntelligence, "1"))


def test_highdicom_needs_the_op_workaround(jpeg):
    """highdicom reads an OP photo as an enhanced multi-frame image: without the stand-in it fails. If this test
    fails, highdicom has fixed it and seg.py's workaround can go."""
    ds = read_photo(to_bytes(op_from_jpeg(jpeg, new_study()))).dataset
    mask = np.zeros((1, ds.Rows, ds.Columns), np.uint8)
    with pytest.raises(AttributeError, match="SharedFunctionalGroupsSequence"):
        hd.seg.Segmentation([ds], mask, hd.seg.SegmentationTypeValues.BINARY, [_segment()], hd.UID(), 1, hd.UID(),
                            1, "m", "m", "1", "1")
    stand_in = single_frame_stand_in(ds)
    assert stand_in.SOPClassUID == c.VL_PHOTOGRAPHIC_SOP_CLASS and "NumberOfFrames" not in stand_in
    assert ds.SOPClassUID == c.OP_SOP_CLASS and ds.NumberOfFrames == 1  # the photo itself is untouched


def test_seg_of_an_op_photo_round_trips_and_validates(jpeg, tmp_path):
    ds = read_photo(to_bytes(op_from_jpeg(jpeg, new_study(), laterality="L"))).dataset
    rng = np.random.default_rng(0)
    mask = rng.random((ds.Rows, ds.Columns)) > 0.995
    seg = build_seg(ds, mask, "3", 0.17, "0.2.0")
    back = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(to_bytes(seg))))
    pixels = back.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])
    assert np.array_equal(pixels[0, :, :, 0].astype(bool), mask)
    refs = back.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert (refs.ReferencedSOPClassUID, refs.ReferencedSOPInstanceUID) == (c.OP_SOP_CLASS, ds.SOPInstanceUID)
    source_ref = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert source_ref.ReferencedSOPClassUID == c.OP_SOP_CLASS
    assert list(back.PatientOrientation) == list(ds.PatientOrientation)
    assert back.SOPInstanceUID == output_uid("seg", ds.SOPInstanceUID, "3")
    assert dciodvfy_errors(seg, tmp_path) == []


def test_output_uids_are_deterministic_per_source_and_version():
    a = output_uid("sr", "1.2.3", "3")
    assert a == output_uid("sr", "1.2.3", "3")
    others = {output_uid("sr", "1.2.3", "2"), output_uid("sr", "1.2.4", "3"), output_uid("seg", "1.2.3", "3")}
    assert len({a} | others) == 4
    with pytest.raises(ValueError):
        output_uid("probability", "1.2.3", "3")


@pytest.mark.parametrize("dicom, detected, expected", [
    ("L", "left", c.LATERALITY_AGREES), ("R", "left", c.LATERALITY_DISAGREES), ("L", "right", c.LATERALITY_DISAGREES),
    (None, "left", c.LATERALITY_NOT_CHECKED), ("R", "unknown", c.LATERALITY_NOT_CHECKED),
])
def test_laterality_check(dicom, detected, expected):
    code, text = laterality_check(dicom, {"eye": {"laterality": detected}})
    assert code == expected
    if expected == c.LATERALITY_DISAGREES:
        assert f"ImageLaterality {dicom}" in text and f"{detected} eye" in text


def test_private_codes_are_unique_and_documented():
    values = [code.value for code in c.PRIVATE_CODES]
    assert len(values) == len(set(values))
    text = (Path(__file__).resolve().parents[1] / "docs" / "dicom.md").read_text()
    missing = [f"{code.value} {code.meaning}" for code in c.PRIVATE_CODES if f"| {code.value} | {code.meaning} |"
               not in text]
    assert missing == []


def test_orthanc_config_of_a_run(tmp_path):
    """The run's configuration is the repository's with this run's ports, AE title, folder and C-STORE peers."""
    base = json.loads((pacs.CONFIG_DIR / "orthanc.json").read_text())
    path = pacs.write_config(tmp_path, 18042, 14242, "TESTAE", 2, ("127.0.0.1", "192.0.2.7"))
    config = json.loads(path.read_text())
    assert (config["HttpPort"], config["DicomPort"], config["DicomAet"], config["StableAge"]) == \
        (18042, 14242, "TESTAE", 2)
    assert config["StorageDirectory"] == str(tmp_path / "db")
    assert {k: v for k, v in config.items() if k in base and k not in pacs.RUN_KEYS} == \
        {k: v for k, v in base.items() if k not in pacs.RUN_KEYS}
    assert config["RemoteAccessAllowed"] is False and config["OverwriteInstances"] is False
    lua = Path(config["LuaScripts"][0]).read_text()
    assert '["127.0.0.1"] = true, ["192.0.2.7"] = true' in lua and "@ALLOWED@" not in lua


def test_gateway_state_survives_a_restart(tmp_path):
    state = State.load(tmp_path / "state.json")
    assert (state.last_change, state.pending) == (0, [])
    state.last_change, state.pending = 41, ["abc"]
    state.save()
    again = State.load(tmp_path / "state.json")
    assert (again.last_change, again.pending) == (41, ["abc"])
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_bad_attribute_values_are_refused_not_raised(jpeg):
    data = to_bytes(op_from_jpeg(jpeg, new_study(), transfer_syntax="explicit"))
    element = b"\x28\x00\x08\x00IS\x02\x001 "  # NumberOfFrames "1 ", explicit VR little endian
    assert data.count(element) == 1
    with pytest.raises(Refused, match="unreadable image attributes: ValueError"):
        read_photo(data.replace(element, element[:-2] + b"ab"))  # as a damaged camera file would carry it


def test_a_change_that_keeps_failing_is_passed_with_its_pending_study(tmp_path):
    """After tries_per_change unexpected failures the gateway passes that change (or drops that pending study)
    instead of retrying it for ever; an outage never counts (it is retried, run() does not call give_up)."""
    gateway = Gateway(Settings(orthanc_url="http://127.0.0.1:9", state_dir=tmp_path))
    gateway.state.last_change, gateway.state.pending = 7, ["s1", "s2"]
    gateway.in_progress = ("change", 9)
    gateway.give_up()
    gateway.in_progress = ("pending study", "s1")
    gateway.give_up()
    again = State.load(tmp_path / "state.json")
    assert (again.last_change, again.pending) == (9, ["s2"])
