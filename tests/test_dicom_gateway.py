"""The DICOM gateway with the real things: Orthanc started from deploy/orthanc/ on free ports in a temporary
folder, the real ensemble (the session's Triton), the gateway as its own process; camera-like OP files sent by
pynetdicom C-STORE and by STOW-RS; the results read back from Orthanc with highdicom and checked by dciodvfy.
Then the faults: the gateway killed mid-burst, Orthanc killed and restarted mid-burst, Triton killed mid-burst
(serve.py restarts it): no result lost, none duplicated."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import highdicom as hd
from highdicom.sr.utils import find_content_items
import numpy as np
import psutil
import pytest
from pydicom.sr.codedict import codes as sr_codes
from conftest import free_ports, make_client, start_server, stop_server
from dicom_helpers import (ct_image, dciodvfy_errors, download, grey_colour_op, monochrome_op, multiframe_op,
                           new_study, op_truncated_jpeg, op_without_pixels, sample_jpeg, start_gateway,
                           wait_for_outputs)

from fundus_hemorrhage import client as service
from fundus_hemorrhage_dicom import codes as c
from fundus_hemorrhage_dicom.camera import op_from_jpeg, to_bytes
from fundus_hemorrhage_dicom.ids import output_uid
from fundus_hemorrhage_dicom.pacs import start_orthanc
from fundus_hemorrhage_dicom.results import outputs_for
from fundus_hemorrhage_dicom.seg import mask_from_png
from fundus_hemorrhage_dicom.send import c_store, outputs_of, stow_rs, study_ids, study_instances
from fundus_hemorrhage_dicom.source import read_photo

codes_dcm = sr_codes.DCM
BURST_WIDTH = 1024  # the fault tests' photos: small, so a burst is seconds of inference on 2 cores


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    http, dicom = free_ports(2)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), http, dicom, stable_age=1)
    yield server
    server.stop()


class Gateway:
    """The gateway process of the module, restartable on its state folder."""

    def __init__(self, orthanc, triton_url, folder):
        self.orthanc, self.triton_url, self.folder = orthanc, triton_url, folder
        self.process = None
        self.start()

    def start(self):
        self.process = start_gateway(self.orthanc.url, self.triton_url, self.folder / "state",
                                     self.folder / "gateway.log")

    def log(self) -> str:
        return self.process.log()


@pytest.fixture(scope="module")
def gateway(orthanc, triton_server, tmp_path_factory):
    gw = Gateway(orthanc, triton_server.grpc_url, tmp_path_factory.mktemp("gateway"))
    yield gw
    gw.process.stop()


def served(triton_server, image_bytes: list[bytes]):
    return service.segment_batch(make_client(triton_server, "grpc"), "grpc", image_bytes)


def by_uid(outputs: list[dict]) -> dict[str, dict]:
    return {o["MainDicomTags"]["SOPInstanceUID"]: o for o in outputs}


def sr_numbers(sr) -> dict:
    """The SR's numbers and codes, read with highdicom's TID 1500 classes."""
    report = hd.sr.MeasurementReport.from_sequence([sr])
    photo = report.get_image_measurement_groups()[0]
    values = {m.name.value: m.value for m in photo.get_measurements()}
    codes = {q.name.value: q.value.value for q in photo.get_qualitative_evaluations()}
    lesions = []
    for group in report.get_planar_roi_measurement_groups():
        lesions.append({"id": int(str(group.tracking_identifier).split()[-1]),
                        **{m.name.value: m.value for m in group.get_measurements()},
                        **{q.name.value: q.value.meaning for q in group.get_qualitative_evaluations()}})
    algorithm = {name.value: [item.TextValue for item in find_content_items(photo[0], name=name, recursive=True)]
                 for name in (codes_dcm.AlgorithmName, codes_dcm.AlgorithmVersion, codes_dcm.AlgorithmParameters)}
    return {"values": values, "codes": codes, "lesions": sorted(lesions, key=lambda les: les["id"]),
            "algorithm": algorithm}


def check_sr_equals_report(sr, report: dict) -> None:
    got = sr_numbers(sr)
    assert got["values"][c.NUMBER_OF_LESIONS.value] == report["totals"]["count"]
    assert got["values"][c.AREA.value] == pytest.approx(sum(les["area_mm2"] for les in report["lesions"]), abs=1e-6)
    assert got["values"][c.THRESHOLD_VALUE.value] == pytest.approx(report["threshold"])
    findings = report["findings"]
    assert got["values"][c.LESIONS_WITHIN_1DD.value] == findings["lesions_within_1dd_of_fovea"]["count"]
    assert got["values"][c.QUADRANTS_WITH_HEMORRHAGE.value] == findings["quadrants_with_hemorrhage"]
    assert got["values"][c.QUADRANTS_WITH_20.value] == findings["quadrants_with_20_or_more"]
    met = findings["rule_4_2_1_hemorrhage_criterion_met"]
    assert got["codes"][c.RULE_4_2_1.value] == (c.YES if met else c.NO).value
    assert len(got["lesions"]) == len(report["lesions"])
    for mine, theirs in zip(got["lesions"], report["lesions"]):
        assert mine["id"] == theirs["id"]
        assert mine[c.AREA.value] == pytest.approx(theirs["area_mm2"], abs=1e-9)
        assert mine[c.DISTANCE_TO_FOVEA.value] == pytest.approx(theirs["distance_to_fovea_dd"], abs=1e-9)
        assert mine[c.ETDRS_SUBFIELD.value] == c.SUBFIELD_CODES[theirs["etdrs_subfield"]].meaning
        assert mine[c.RETINAL_QUADRANT.value] == c.QUADRANT_CODES[theirs["retinal_quadrant"]].meaning
    assert got["algorithm"]["111001"] == ["fundus_hemorrhage unet"]
    assert got["algorithm"]["111003"] == [str(report["model"]["version"])]
    assert sorted(got["algorithm"]["111002"]) == sorted([f"threshold={report['threshold']}",
                                                         f"min_lesion_area_px={report['min_lesion_area_px']}"])


def test_cstore_study_gets_seg_sr_overlay_back(orthanc, gateway, triton_server, tmp_path):
    """A 2-photo study as a camera sends it: one JPEG Baseline photo (labelled with the eye the model sees), one
    uncompressed RGB photo labelled with the wrong eye."""
    jpegs = [sample_jpeg(0), sample_jpeg(1)]
    eyes = [r.report["eye"]["laterality"] for r in served(triton_server, jpegs)]
    assert set(eyes) <= {"left", "right"}
    study = new_study()
    right_label = "R" if eyes[0] == "right" else "L"
    wrong_label = "L" if eyes[1] == "right" else "R"
    photos = [op_from_jpeg(jpegs[0], study, right_label, 1, "jpeg"),
              op_from_jpeg(jpegs[1], study, wrong_label, 2, "explicit")]
    assert c_store(photos, orthanc.dicom_port) == [0, 0]
    outputs = by_uid(wait_for_outputs(orthanc.url, study.study_uid, 6, gateway=gateway.process))
    results = served(triton_server, [read_photo(to_bytes(p)).image_bytes for p in photos])
    for photo, result, check in zip(photos, results, (c.LATERALITY_AGREES, c.LATERALITY_DISAGREES)):
        version = result.report["model"]["version"]
        uids = {kind: output_uid(kind, photo.SOPInstanceUID, version) for kind in ("seg", "sr", "overlay")}
        assert set(uids.values()) <= set(outputs)
        seg = hd.seg.Segmentation.from_dataset(download(orthanc.url, outputs[uids["seg"]]["ID"]))
        pixels = seg.get_pixels_by_source_instance([photo.SOPInstanceUID], segment_numbers=[1])[0, :, :, 0]
        mask = mask_from_png(result.mask_png, (photo.Rows, photo.Columns))
        assert mask.any() and np.array_equal(pixels.astype(bool), mask)
        sr = download(orthanc.url, outputs[uids["sr"]]["ID"])
        check_sr_equals_report(sr, result.report)
        assert sr_numbers(sr)["codes"][c.LATERALITY_CHECK.value] == check.value
        overlay = download(orthanc.url, outputs[uids["overlay"]]["ID"])
        assert (overlay.Rows, overlay.Columns) == (photo.Rows, photo.Columns)
        assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == photo.SOPInstanceUID
        for kind, ds in (("SEG", seg), ("SR", sr), ("overlay", overlay)):
            assert dciodvfy_errors(ds, tmp_path) == [], kind
        assert {o["series_tags"]["Modality"] for o in (outputs[u] for u in uids.values())} == {"SEG", "SR", "OT"}
    assert "disagrees" in gateway.log() or "but the photo shows" in gateway.log()
    # its own stores make the study stable again: nothing is processed twice, nothing more is stored
    time.sleep(4)
    assert len(outputs_of(orthanc.url, study.study_uid)) == 6
    assert sum(f"of study" in line and "unet v" in line and photos[0].SOPInstanceUID in line
               for line in gateway.log().splitlines()) == 1


def test_stow_rs_photo_gets_results(orthanc, gateway, triton_server):
    study = new_study()
    photo = op_from_jpeg(sample_jpeg(2, 1600), study, "L", 1, "implicit")
    response = stow_rs([photo], orthanc.dicomweb_url)
    assert response.status_code == 200, response.text[:500]
    outputs = by_uid(wait_for_outputs(orthanc.url, study.study_uid, 3, gateway=gateway.process))
    result = served(triton_server, [read_photo(to_bytes(photo)).image_bytes])[0]
    seg_uid = output_uid("seg", photo.SOPInstanceUID, result.report["model"]["version"])
    seg = hd.seg.Segmentation.from_dataset(download(orthanc.url, outputs[seg_uid]["ID"]))
    pixels = seg.get_pixels_by_source_instance([photo.SOPInstanceUID], segment_numbers=[1])[0, :, :, 0]
    assert np.array_equal(pixels.astype(bool), mask_from_png(result.mask_png, (photo.Rows, photo.Columns)))


def test_bad_inputs_are_refused_with_a_reason_and_the_rest_is_processed(orthanc, gateway, tmp_path):
    study = new_study()
    jpeg = sample_jpeg(0, BURST_WIDTH)
    good = op_from_jpeg(jpeg, study, "L", 1)
    bad = {"monochrome photograph": monochrome_op(study, jpeg),
           "multi-frame photograph (2 frames": multiframe_op(study, jpeg),
           "no pixel data": op_without_pixels(study, jpeg),
           "pixel data cannot be decoded": op_truncated_jpeg(study, jpeg),
           "not an ophthalmic photograph (modality CT)": ct_image(study)}
    grey = grey_colour_op(study, jpeg)
    assert c_store([good, *bad.values(), grey], orthanc.dicom_port) == [0] * 7
    outputs = by_uid(wait_for_outputs(orthanc.url, study.study_uid, 4, gateway=gateway.process))
    kinds = Counter(o["series_tags"]["Modality"] for o in outputs.values())
    assert kinds == {"SEG": 1, "SR": 2, "OT": 1}  # the good photo's three, the ungradable photo's SR alone
    sr_uids = [u for u, o in outputs.items() if o["series_tags"]["Modality"] == "SR"]
    ungradable = [download(orthanc.url, outputs[u]["ID"]) for u in sr_uids]
    ungradable = [sr for sr in ungradable if sr_numbers(sr)["codes"][c.IMAGE_QUALITY.value] == c.UNGRADABLE.value]
    assert len(ungradable) == 1
    group = hd.sr.MeasurementReport.from_sequence([ungradable[0]]).get_image_measurement_groups()[0]
    reasons = [q.value.value for q in group.get_qualitative_evaluations(name=c.UNGRADABLE_REASON)]
    assert c.REASON_CODES["not a colour photograph"].value in reasons
    assert [m.name.value for m in group.get_measurements()] == [c.THRESHOLD_VALUE.value]  # no counts
    assert dciodvfy_errors(ungradable[0], tmp_path) == []
    log, (study_id,) = gateway.log(), study_ids(orthanc.url, study.study_uid)
    for reason in bad:
        assert sum(reason in line and "refused" in line and study_id in line for line in log.splitlines()) == 1, \
            reason
    assert gateway.process.process.poll() is None


def burst(orthanc, count: int, index: int = 0):
    studies = [new_study(patient_id=f"B{index}-{i}") for i in range(count)]
    jpeg = sample_jpeg(index, BURST_WIDTH)
    for i, study in enumerate(studies):
        assert c_store([op_from_jpeg(jpeg, study, "L", 1)], orthanc.dicom_port) == [0]
    return studies


def done_count(orthanc, studies) -> int:
    return sum(len(outputs_of(orthanc.url, s.study_uid)) >= 3 for s in studies)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def assert_exactly_once(orthanc, studies, gateway, timeout: float = 180.0) -> None:
    for study in studies:
        outputs = wait_for_outputs(orthanc.url, study.study_uid, 3, timeout, gateway.process)
        assert sorted(o["series_tags"]["Modality"] for o in outputs) == ["OT", "SEG", "SR"], study.patient_id
    time.sleep(3)  # nothing more arrives
    for study in studies:
        assert len(study_instances(orthanc.url, study.study_uid)) == 4, study.patient_id


def test_gateway_killed_mid_burst_loses_and_duplicates_nothing(orthanc, gateway):
    studies = burst(orthanc, 5, 1)
    wait_until(lambda: done_count(orthanc, studies) >= 1, 120, "the first result")
    gateway.process.kill()
    assert done_count(orthanc, studies) < len(studies)
    gateway.start()
    assert_exactly_once(orthanc, studies, gateway)


def test_orthanc_restarted_mid_burst_loses_and_duplicates_nothing(orthanc, gateway):
    studies = burst(orthanc, 4, 2)
    wait_until(lambda: done_count(orthanc, studies) >= 1, 120, "the first result")
    orthanc.process.send_signal(signal.SIGKILL)
    orthanc.process.wait()
    time.sleep(2)  # the gateway meets a dead Orthanc and backs off
    restarted = orthanc.restart()
    orthanc.process = restarted.process
    assert_exactly_once(orthanc, studies, gateway)
    assert any("retrying change" in line and "Orthanc at" in line for line in gateway.log().splitlines())


def tritonserver_of(server) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return next(p for p in children if p.name() == "tritonserver")


def test_triton_killed_mid_burst_loses_and_duplicates_nothing(tmp_path):
    """On a Triton, Orthanc and gateway of its own, so the session's server is not disturbed: tritonserver is
    killed after the first result, serve.py starts it again, the gateway waits and goes on."""
    server = start_server(tmp_path)
    http, dicom = free_ports(2)
    own_orthanc = start_orthanc(tmp_path / "orthanc", http, dicom, stable_age=1)
    own_gateway = Gateway(own_orthanc, server.grpc_url, tmp_path)
    try:
        studies = burst(own_orthanc, 4, 0)
        wait_until(lambda: done_count(own_orthanc, studies) >= 1, 120, "the first result")
        os.kill(tritonserver_of(server).pid, signal.SIGKILL)  # serve.py starts it again
        assert done_count(own_orthanc, studies) < len(studies)
        assert_exactly_once(own_orthanc, studies, own_gateway, timeout=300)
        assert any("retrying change" in line and "Triton" in line for line in own_gateway.log().splitlines())
    finally:
        own_gateway.process.stop()
        own_orthanc.stop()
        stop_server(server)


def test_cstore_from_a_peer_not_allowed_is_refused(tmp_path):
    """The Lua filter of deploy/orthanc/ (Orthanc 1.10 listens on every interface): only --dicom-allow peers'
    instances are stored. (Orthanc 1.10 answers the refused sender "Success": see dicom_peers.lua.in.)"""
    http, dicom = free_ports(2)
    closed = start_orthanc(tmp_path / "orthanc", http, dicom, dicom_allow=("192.0.2.1",))
    try:
        study = new_study()
        c_store([op_from_jpeg(sample_jpeg(0, 320), study)], dicom)
        assert study_instances(closed.url, study.study_uid) == []
        assert "refused C-STORE from 127.0.0.1" in closed.log_path.read_text(errors="replace")
    finally:
        closed.stop()


def without_retinal_frame(report: dict) -> dict:
    """The report as the service writes it when the disc or the fovea is not found (README: zone fields null)."""
    out = json.loads(json.dumps(report))
    out.update(optic_disc=None, fovea=None, scale=None, retinal_quadrants=None, etdrs=None, findings=None,
               eye={"laterality": "unknown", "method": None})
    for lesion in out["lesions"]:
        lesion.update(distance_to_fovea_dd=None, distance_to_fovea_um=None, area_mm2=None, retinal_quadrant=None,
                      etdrs_subfield=None)
    return out


def test_sr_without_a_retinal_frame_gives_pixels_and_no_zones(triton_server, tmp_path):
    photo = read_photo(to_bytes(op_from_jpeg(sample_jpeg(0, BURST_WIDTH), new_study(), "L")))
    result = served(triton_server, [photo.image_bytes])[0]
    assert result.ok and result.report["lesions"]
    result.report = without_retinal_frame(result.report)
    seg, sr, overlay = outputs_for(photo, result).datasets
    got = sr_numbers(sr)
    assert got["values"][c.NUMBER_OF_LESIONS.value] == len(result.report["lesions"])
    assert c.AREA.value not in got["values"] and c.LESIONS_WITHIN_1DD.value not in got["values"]
    assert c.RULE_4_2_1.value not in got["codes"]
    assert got["codes"][c.LATERALITY_CHECK.value] == c.LATERALITY_NOT_CHECKED.value
    assert [les[c.AREA.value] for les in got["lesions"]] == [les["area_px"] for les in result.report["lesions"]]
    assert all(c.ETDRS_SUBFIELD.value not in les and c.DISTANCE_TO_FOVEA.value not in les for les in got["lesions"])
    for ds in (seg, sr, overlay):
        assert dciodvfy_errors(ds, tmp_path) == []
