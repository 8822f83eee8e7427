"""build_engines.py and fundus_hemorrhage_ops.engines on the CPU: export + Polygraphy parity, version folders with
their identity, INT8 and its gate, served-mask parity of rebuilds and its tolerance, FP16 ONNX, config.pbtxt;
what model.json declares (the preprocessing plan, the int8 calibration set and its cache) and what rebuilds and serving
do with it.

A tiny U-Net (made here, saved as a real checkpoint) works at 64 px so that most tests run in seconds; its
repositories are built in tmp_path (never in model_repository/). Photos and masks are the committed samples.
The slow tests rebuild the shipped fp32 and int8 versions from their checkpoints on a copy of the model repository.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import build_engines as be
from fundus_hemorrhage import contract as c
from fundus_hemorrhage import model_config as mc
from fundus_hemorrhage_ops.engines import BuildError
from fundus_hemorrhage_ops.engines.build import build
from fundus_hemorrhage_ops.engines.identity import read_identity, strip_identity
from fundus_hemorrhage_ops.engines.calibration import (CACHE_FILE, cache_from_qdq_graph, read_cache, recorded_cache,
                                                       resolve, write_cache)
from fundus_hemorrhage_ops.engines.int8 import PhotoCalibrationReader, quantize_int8
from fundus_hemorrhage_ops.engines.parity import (FP32_TOLERANCE, SERVED_TOLERANCE, photo_difference, preprocessed,
                                              served_difference_reason, served_outputs)
from fundus_hemorrhage_ops.engines.tensorrt import to_float16
from fundus_hemorrhage_ops.engines.plan import plan_difference, preprocess_config, preprocessing_plan, served_plan
from fundus_hemorrhage_ops.engines.version_folder import MODEL_PY, sha256, shipped_fp32_onnx, versions
from fundus_hemorrhage_ops.serving.validation import validate_version
from fundus_hemorrhage.preprocessing import PreprocessConfig
from fundus_hemorrhage.onnx_session import create_session, run
from fundus_hemorrhage_training.common import save_checkpoint
from fundus_hemorrhage_training.model import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO_ROOT / "samples").glob("IDRiD_*[0-9].jpg"))
SIZE = 64


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build_engines")
    torch.manual_seed(0)
    model = build_model({"channels": [4, 8, 8, 8, 8]})
    with torch.no_grad():  # non-trivial BN statistics, so the folded biases differ like a trained model's
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    (root / "checkpoints").mkdir()
    save_checkpoint(root / "checkpoints" / "tiny.pt", model, stage="supervised", config={"working_size": SIZE},
                    metrics={"pixel_aupr": 0.1}, extra={"threshold": 0.5})
    with open(root / "manifest.csv", "w", newline="") as f:  # samples: two to calibrate on, one to validate
        w = csv.writer(f)
        w.writerow(["id", "image", "mask", "width", "height", "label_quality", "split", "he_fraction"])
        for photo, split in zip(SAMPLES, ["train", "train", "val"]):
            w.writerow([photo.stem, photo, photo.with_name(photo.stem + "_HE.png"), 4288, 2848, "exact", split, 0])
    return root


@pytest.fixture(scope="module")
def built(work) -> Path:
    """A repository with version 1 built from the tiny checkpoint (FP32)."""
    repo = work / "repo"
    code = be.main(["--target", "cpu", "--model-repository", str(repo), "--checkpoint",
                    str(work / "checkpoints" / "tiny.pt"), "--checkpoints-dir", str(work / "checkpoints")])
    assert code == 0
    return repo


def outputs(path: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    return run(create_session(path), pixels)


def test_cpu_build_writes_a_consistent_version(built):
    unet = built / "unet"
    folder = unet / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.py"]
    assert (folder / "model.py").read_text() == MODEL_PY
    assert MODEL_PY == (REPO_ROOT / "model_repository" / "unet" / "1" / "model.py").read_text()
    meta = json.loads((folder / "model.json").read_text())
    assert meta["precision"] == "fp32" and meta["checkpoint"] == "tiny.pt" and meta["threshold"] == 0.5
    assert meta["model_config"]["channels"] == [4, 8, 8, 8, 8] and meta["build"]["working_size"] == SIZE
    # what its PIXELS must be: the served preprocessing at its working size
    assert meta["preprocessing"] == served_plan(SIZE) and meta["preprocessing"]["working_size"] == SIZE
    parity = meta["parity"]["onnxruntime_vs_pytorch"]
    assert parity["passed"] and parity["batches"] == [1, 2] and parity["max_abs"] <= FP32_TOLERANCE["atol"]

    config = mc.read_config(unet)  # a fresh repository gets the generated config
    assert config == mc.unet_config("cpu", SIZE, c.MAX_BATCH_SIZE)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [c.PIXELS]
    assert [o.name for o in model.graph.output] == [o.name for o in config.output]
    assert read_identity(model) == (1, 0.5)  # the version names itself, with the checkpoint's threshold
    out = outputs(folder / "model.onnx", np.zeros((3, 3, SIZE, SIZE), np.float32))
    assert out[c.PROBABILITY].shape == (3, 1, SIZE, SIZE)  # dynamic batch axis
    assert out[c.THRESHOLD].tolist() == [[0.5]] * 3 and out[c.MODEL_VERSION].tolist() == [[1]] * 3


def test_rebuild_of_newest_version_serves_the_same_masks(built, work):
    # no --checkpoint: the newest version's model.json names tiny.pt, looked up in the checkpoints folder
    assert be.main(["--target", "cpu", "--model-repository", str(built),
                    "--checkpoints-dir", str(work / "checkpoints")]) == 0
    meta = json.loads((built / "unet" / "2" / "model.json").read_text())
    assert meta["precision"] == "fp32" and read_identity(built / "unet" / "2" / "model.onnx") == (2, 0.5)
    same = meta["parity"]["served_masks_vs_version_1"]
    assert same["passed"] and same["differing_pixels"] == 0 and same["photos"] == len(SAMPLES)
    assert same["pixels"] == sum(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).size for p in SAMPLES)
    assert not list((built / "unet").glob(".building-*"))


def test_int8_cli_ships_or_keeps_fp32_by_the_aupr_gate_and_rebuilds_within_tolerance(built, work):
    common = ["--target", "cpu", "--model-repository", str(built), "--checkpoint",
              str(work / "checkpoints" / "tiny.pt"), "--checkpoints-dir", str(work / "checkpoints"),
              "--manifest", str(work / "manifest.csv"), "--calibration-images", "2"]
    assert be.main([*common, "--int8", "--version", "10", "--int8-max-aupr-drop", "-1"]) == 0  # never good enough
    meta = json.loads((built / "unet" / "10" / "model.json").read_text())
    assert meta["precision"] == "fp32" and meta["int8"]["shipped"] is False
    assert not [p for p in ("model_fp32.onnx", CACHE_FILE) if (built / "unet" / "10" / p).exists()]
    assert {"pixel_aupr", "latency_ms_batch1_2threads"} <= set(meta["int8"]["int8"]) and meta["int8"]["fp32"]

    assert be.main([*common, "--int8", "--version", "11", "--int8-max-aupr-drop", "1"]) == 0
    folder = built / "unet" / "11"
    meta = json.loads((folder / "model.json").read_text())
    assert meta["precision"] == "int8" and meta["int8"]["shipped"] is True
    calibration = meta["int8"]["calibration"]  # the first two train photos of the manifest, by id and file hash
    assert calibration["photos"] == [{"id": p.stem, "sha256": sha256(p)} for p in SAMPLES[:2]]
    assert calibration["preprocessing"] == meta["preprocessing"] == served_plan(SIZE)
    assert recorded_cache(folder, calibration, 11) == cache_from_qdq_graph(folder / "model.onnx")  # its result
    assert meta["int8"]["calibration_source"] == "version 10's recorded photos, calibrated again (MinMax)"  # no cache
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(folder / "model.onnx")).graph.node)
    # both graphs of the folder name version 11; the FP32 one is the source of GPU plans
    assert read_identity(folder / "model.onnx") == read_identity(folder / "model_fp32.onnx") == (11, 0.5)

    # a rebuild of the newest (int8) version keeps int8 and is judged with the int8 tolerance
    assert be.main([*common, "--int8-max-aupr-drop", "1"]) == 0
    meta = json.loads((built / "unet" / "12" / "model.json").read_text())
    same = meta["parity"]["served_masks_vs_version_11"]
    assert meta["precision"] == "int8" and same["passed"] and same["precision"] == "int8"
    assert same["tolerance"]["min_dice"] == SERVED_TOLERANCE["int8"].min_dice
    assert same["min_dice"] == 1.0 and same["differing_pixels"] == 0  # same machine, same kernels: identical
    assert meta["int8"]["calibration"] == calibration  # the recorded set and its cache, not a new draw
    assert meta["int8"]["calibration_source"] == f"calibration cache of version 11 ({CACHE_FILE})"


def _tiny_int8(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(the tiny FP32 graph without identity, the same quantised on two sample photos) in tmp_path."""
    onnx.save(strip_identity(onnx.load(str(built / "unet" / "1" / "model.onnx"))), str(tmp_path / "fp32.onnx"))
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", PhotoCalibrationReader(SAMPLES[:2], SIZE))
    return tmp_path / "fp32.onnx", tmp_path / "int8.onnx"


def test_int8_qdq_model_is_valid_close_to_fp32_and_its_cache_round_trips(built, tmp_path):
    fp32, int8 = _tiny_int8(built, tmp_path)
    model = onnx.load(str(int8))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    x = np.stack([preprocessed(p, SIZE).pixels for p in SAMPLES])  # per-channel int8 weights, close to FP32
    ref, got = (outputs(path, x)[c.PROBABILITY] for path in (fp32, int8))
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 0.02 and np.abs(got - ref).max() < 0.15

    cache = cache_from_qdq_graph(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert list(cache) == list(dict.fromkeys(n.input[0] for n in activations)) and c.PIXELS in cache
    for node in activations:  # exactly the graph's float32 scale and uint8 zero point
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        assert scale.dtype == np.float32 and zero.dtype == np.uint8
        assert cache[node.input[0]] == {"scale": float(scale), "zero_point": int(zero)}
    path = write_cache(tmp_path / CACHE_FILE, cache)
    assert read_cache(path) == cache and json.loads(path.read_text())["format"] == 1
    assert write_cache(tmp_path / "again.json", read_cache(path)).read_bytes() == path.read_bytes()
    (tmp_path / "broken.json").write_text(path.read_text().replace('"scale": ', '"scale": -', 1))
    with pytest.raises(BuildError, match=f"broken.json.*{c.PIXELS}: scale -"):
        read_cache(tmp_path / "broken.json")


def test_quantizing_with_a_cache_gives_exactly_its_scales(built, tmp_path):
    fp32, int8 = _tiny_int8(built, tmp_path)
    calibrated = cache_from_qdq_graph(int8)
    # other scales than any calibration would give: the graph must carry them, not the photos' ranges
    other = {name: {"scale": float(np.float32(e["scale"] * 1.37)), "zero_point": min(255, e["zero_point"] + 3)}
             for name, e in calibrated.items()}
    info = quantize_int8(fp32, tmp_path / "cached.onnx", cache=other)
    assert cache_from_qdq_graph(tmp_path / "cached.onnx") == other and info["activation_scales"] == len(other)
    quantize_int8(fp32, tmp_path / "same.onnx", cache=calibrated)  # the calibration's own cache: the same graph
    assert onnx.load(str(tmp_path / "same.onnx")).graph == onnx.load(str(int8)).graph
    with pytest.raises(BuildError, match="does not have"):
        quantize_int8(fp32, tmp_path / "foreign.onnx", cache={**other, "/no/such/tensor": other[c.PIXELS]})

    # v2's recovered cache on v2's FP32 graph gives the shipped int8 graph exactly
    v2 = REPO_ROOT / "model_repository" / "unet" / "2"
    cache = recorded_cache(v2, json.loads((v2 / "model.json").read_text())["int8"]["calibration"], 2)
    onnx.save(strip_identity(onnx.load(str(v2 / "model_fp32.onnx"))), str(tmp_path / "v2_fp32.onnx"))
    quantize_int8(tmp_path / "v2_fp32.onnx", tmp_path / "v2_int8.onnx", cache=cache)
    assert onnx.load(str(tmp_path / "v2_int8.onnx")).graph == strip_identity(onnx.load(str(v2 / "model.onnx"))).graph


def _manifest(path: Path, rows: list[tuple[Path, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "mask", "width", "height", "label_quality", "split", "he_fraction"])
        for photo, split in rows:
            w.writerow([photo.stem, photo, REPO_ROOT / "samples" / f"{photo.stem}_HE.png", 4288, 2848, "exact",
                        split, 0])
    return path


def test_rebuild_quantizes_with_the_cache_and_names_missing_or_changed_photos(work, tmp_path, capsys):
    (tmp_path / "photos").mkdir()  # copies of the samples: their bytes get changed below
    a, b, v = (Path(shutil.copy(p, tmp_path / "photos" / p.name)) for p in SAMPLES)
    repo, unet = tmp_path / "repo", tmp_path / "repo" / "unet"
    common = ["--target", "cpu", "--model-repository", str(repo), "--checkpoint", str(work / "checkpoints" / "tiny.pt"),
              "--checkpoints-dir", str(work / "checkpoints"), "--calibration-images", "1", "--int8-max-aupr-drop", "1"]
    first = _manifest(tmp_path / "m1.csv", [(a, "train"), (b, "train"), (v, "val")])
    assert be.main([*common, "--int8", "--manifest", str(first)]) == 0
    recorded = json.loads((unet / "1" / "model.json").read_text())["int8"]["calibration"]
    assert recorded["photos"] == [{"id": a.stem, "sha256": sha256(a)}] and recorded["cache"]["file"] == CACHE_FILE
    capsys.readouterr()

    def rebuild(manifest: Path, *extra: str) -> tuple[int, str, str]:
        code = be.main([*common, "--manifest", str(manifest), *extra])
        return (code, *capsys.readouterr())  # exit code, stdout, stderr

    # The manifest changed: its rule would now draw b. Each rebuild quantizes with the cache (first version 1's),
    # whether the recorded photo a is there, changed (same id, other bytes) or gone; the log says which.
    moved = _manifest(tmp_path / "m2.csv", [(b, "train"), (a, "test"), (v, "val")])
    for version, change, said in ((2, None, "all there, unchanged"), (3, "bytes", f"changed {a.stem} (sha256"),
                                  (4, "gone", f"missing {a.stem} ({a} not found)")):
        if change == "bytes":
            a.write_bytes(a.read_bytes() + b"\0")
        elif change == "gone":
            a.unlink()
        code, out, _ = rebuild(moved)
        assert code == 0 and f"with version {version - 1}'s calibration cache" in out and said in out, out
        meta = json.loads((unet / str(version) / "model.json").read_text())
        same = meta["parity"][f"served_masks_vs_version_{version - 1}"]
        assert meta["int8"]["calibration"] == recorded and same["min_dice"] == 1.0 and same["differing_pixels"] == 0
        assert cache_from_qdq_graph(unet / str(version) / "model.onnx") == read_cache(unet / "1" / CACHE_FILE)

    # --recalibrate ignores the cache and needs the photos: without them it stops, naming them
    code, _, err = rebuild(first, "--recalibrate")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"missing {a.stem} ({a} not found)" in err, err
    # the cache is the version's result: a changed or lost one stops the rebuild
    cache = unet / "4" / CACHE_FILE
    cache.write_text(cache.read_text().replace('"zero_point": 0', '"zero_point": 1', 1))
    code, _, err = rebuild(moved)
    assert code == 2 and f"version 4's calibration cache {cache} changed" in err, err
    cache.unlink()
    code, _, err = rebuild(moved)
    assert code == 2 and f"{cache} is missing" in err and "--recalibrate" in err, err
    # a version recorded without a cache (built before caches) is calibrated again on its recorded photos, or
    # the rebuild names what is missing
    meta = json.loads((unet / "4" / "model.json").read_text())
    del meta["int8"]["calibration"]["cache"]
    (unet / "4" / "model.json").write_text(json.dumps(meta))
    code, _, err = rebuild(moved)
    assert code == 2 and f"missing {a.stem} ({a} not found)" in err and "--recalibrate" in err, err
    assert versions(unet) == [1, 2, 3, 4]  # nothing written by the refused builds

    # --recalibrate draws anew (b) and records it and its cache; the masks change, which the operator accepts here
    anew = _manifest(tmp_path / "m3.csv", [(b, "train"), (v, "val")])
    code, out, _ = rebuild(anew, "--recalibrate", "--allow-mask-change")
    assert code == 0 and "version 4's calibration ignored: --recalibrate" in out, out
    calibration = json.loads((unet / "5" / "model.json").read_text())["int8"]["calibration"]
    assert calibration["photos"] == [{"id": b.stem, "sha256": sha256(b)}]
    assert recorded_cache(unet / "5", calibration, 5) == cache_from_qdq_graph(unet / "5" / "model.onnx")


def test_preprocessing_plan_round_trips_and_the_shipped_versions_declare_theirs():
    for config in (PreprocessConfig(), PreprocessConfig(working_size=SIZE, clahe_clip_limit=3.0)):
        plan = preprocessing_plan(config)
        assert json.loads(json.dumps(plan, allow_nan=False)) == plan  # strict JSON ("inf" as a string)
        assert preprocess_config(plan) == config
    with pytest.raises(ValueError, match="pixels"):
        preprocess_config({**served_plan(), "pixels": "float32 BGR"})
    with pytest.raises(ValueError, match="not reproducible"):
        preprocess_config({**served_plan(), "resize": "nearest"})  # a field this runtime does not know
    assert plan_difference(served_plan(), served_plan()) is None
    other = {**served_plan(), "clahe": {**served_plan()["clahe"], "clip_limit": 3.0}}
    assert plan_difference(other, served_plan()) == ("clahe.clip_limit: the version needs 3.0, the preprocess step "
                                                     "does 2.0")

    unet = REPO_ROOT / "model_repository" / "unet"
    for version in versions(unet):
        meta = json.loads((unet / str(version) / "model.json").read_text())
        assert meta["preprocessing"] == served_plan(c.WORKING_SIZE), version
        if meta["precision"] == "int8":
            calibration = meta["int8"]["calibration"]
            assert len(calibration["photos"]) == meta["int8"]["calibration_images"]
            named = [p for p in calibration["photos"] if p["id"]]
            assert named and all(len(p["sha256"]) == 64 for p in named)
            preprocess_config(calibration["preprocessing"])  # a plan this runtime can apply
            # its calibration cache is its graph's (v2's was recovered from it: cache_from_qdq_graph)
            assert recorded_cache(unet / str(version), calibration, version) == cache_from_qdq_graph(
                unet / str(version) / "model.onnx"), version


def test_a_recorded_set_that_cannot_be_reproduced_is_named(tmp_path):
    """v2's record: 5 photos named (not in this manifest), 11 that no longer exist in the data."""
    meta = json.loads((REPO_ROOT / "model_repository" / "unet" / "2" / "model.json").read_text())
    named = [p["id"] for p in meta["int8"]["calibration"]["photos"] if p["id"]]
    with pytest.raises(BuildError) as error:
        resolve(meta["int8"]["calibration"], _manifest(tmp_path / "m.csv", [(SAMPLES[0], "train")]), 2)
    message = str(error.value)
    assert all(f"{pid} (not in the manifest)" in message for pid in named)
    assert f"{16 - len(named)} never identified" in message and "lossy 512x512 copy" in message


def test_serving_refuses_a_version_whose_preprocessing_differs(built, tmp_path):
    unet = tmp_path / "model_repository" / "unet"
    shutil.copytree(built / "unet", unet)
    config = mc.read_config(unet)
    path = unet / "1" / "model.json"
    meta = json.loads(path.read_text())
    assert validate_version(unet / "1", config) is None
    exposure = {**meta["preprocessing"]["exposure"], "normalise_below": 56.0}
    path.write_text(json.dumps({**meta, "preprocessing": {**meta["preprocessing"], "exposure": exposure}}))
    reason = validate_version(unet / "1", config)
    assert reason == ("model.json's preprocessing is not the preprocess step's: exposure.normalise_below: the "
                      "version needs 56.0, the preprocess step does inf")
    # the repository's preprocess step decides the working size: a 64 px version in a 640 px repository
    path.write_text(json.dumps(meta))
    shutil.copytree(REPO_ROOT / "model_repository" / c.PREPROCESS, unet.parent / c.PREPROCESS,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert "working_size: the version needs 64, the preprocess step does 640" in validate_version(unet / "1", config)
    shutil.rmtree(unet.parent / c.PREPROCESS)
    # a model.json without "preprocessing" (versions built before it was recorded) is read as the default plan
    path.write_text(json.dumps({k: v for k, v in meta.items() if k != "preprocessing"}))
    assert validate_version(unet / "1", config) is None


def _mask_and_probability(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A photo-sized probability map (uint8 levels) with blob-shaped lesions, and its mask at level 44 (~0.17)."""
    rng = np.random.default_rng(seed)
    probability = np.zeros((600, 800), np.uint8)
    for _ in range(12):
        center = (int(rng.integers(40, 760)), int(rng.integers(40, 560)))
        cv2.circle(probability, center, int(rng.integers(8, 30)), int(rng.integers(60, 250)), -1)
    probability = cv2.GaussianBlur(probability, (31, 31), 8)
    return (probability > 44).astype(np.uint8) * 255, probability


def test_served_tolerance_accepts_int8_rounding_and_refuses_real_changes():
    mask, probability = _mask_and_probability()
    same = photo_difference(mask, mask, probability, probability)
    assert same["differing_pixels"] == 0 and same["dice"] == 1.0 and same["within_one_level"] == 1.0
    for precision in ("fp32", "int8"):
        assert served_difference_reason(same, SERVED_TOLERANCE[precision]) is None

    # int8-like: one-level differences on a scattered 10 % of pixels, and the mask edge moving where they cross
    # the threshold (the ISA case: 1081 of 36.6 M pixels over 3 photos)
    rng = np.random.default_rng(1)
    step = (rng.random(probability.shape) < 0.1).astype(np.int16) * rng.choice([-1, 1], probability.shape)
    jittered = np.clip(probability.astype(np.int16) + step, 0, 255).astype(np.uint8)
    jittered_mask = (jittered > 44).astype(np.uint8) * 255
    int8_like = photo_difference(mask, jittered_mask, probability, jittered)
    assert 0 < int8_like["differing_pixels"] and int8_like["within_one_level"] == 1.0
    assert int8_like["dice"] > SERVED_TOLERANCE["int8"].min_dice
    assert served_difference_reason(int8_like, SERVED_TOLERANCE["int8"]) is None
    assert "mask pixels differ" in served_difference_reason(int8_like, SERVED_TOLERANCE["fp32"])  # fp32: strict

    # a real change: another model (another lesion layout) or a 10-level shift of the probabilities
    other_mask, other_probability = _mask_and_probability(seed=7)
    other = photo_difference(mask, other_mask, probability, other_probability)
    assert "Dice" in served_difference_reason(other, SERVED_TOLERANCE["int8"])
    shifted = np.clip(probability.astype(np.int16) + 10, 0, 255).astype(np.uint8)
    shift = photo_difference(mask, (shifted > 44).astype(np.uint8) * 255, probability, shifted)
    assert served_difference_reason(shift, SERVED_TOLERANCE["int8"]) is not None
    with pytest.raises(ValueError):
        photo_difference(mask, mask[1:], probability, probability)


def test_fp16_onnx_keeps_fp32_io_and_the_identity(built):
    fp32 = onnx.load(str(built / "unet" / "1" / "model.onnx"))
    fp16 = to_float16(fp32)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in (*fp16.graph.input, *fp16.graph.output)] == [
        f32, f32, f32, onnx.TensorProto.INT32]
    assert {i.data_type for i in fp16.graph.initializer if not i.name.startswith("version_identity/")} == {f16}
    assert read_identity(fp16) == read_identity(fp32) == (1, 0.5)
    x = np.stack([preprocessed(p, SIZE).pixels for p in SAMPLES[:2]])
    ref = outputs(built / "unet" / "1" / "model.onnx", x)
    # an in-memory graph (create_session takes files): ORT's defaults suffice for a numeric check
    got = run(ort.InferenceSession(fp16.SerializeToString(), providers=["CPUExecutionProvider"]), x)
    assert got[c.PROBABILITY].dtype == np.float32 and np.abs(got[c.PROBABILITY] - ref[c.PROBABILITY]).max() < 0.01
    assert np.array_equal(got[c.THRESHOLD], ref[c.THRESHOLD]) and np.array_equal(got[c.MODEL_VERSION],
                                                                                 ref[c.MODEL_VERSION])


def test_working_size_must_match_the_repository(work, tmp_path):
    repo = tmp_path / "repo"
    (repo / "unet").mkdir(parents=True)
    mc.write_config(repo / "unet", mc.unet_config("cpu", 640))
    with pytest.raises(BuildError, match="640"):
        build(be.parse_args(["--target", "cpu", "--model-repository", str(repo),
                             "--checkpoint", str(work / "checkpoints" / "tiny.pt")]))
    assert sorted(p.name for p in (repo / "unet").iterdir()) == ["config.pbtxt"]  # nothing half-written


def test_default_checkpoint_must_be_shipped(built, tmp_path, capsys):
    code = be.main(["--target", "cpu", "--model-repository", str(built), "--checkpoints-dir", str(tmp_path)])
    assert code == 2 and "not in" in capsys.readouterr().err


def test_help_works_from_any_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "build_engines.py"), "--help"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and "--target" in result.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None and importlib.util.find_spec("tensorrt") is not None,
                    reason="a GPU with TensorRT is present")
def test_tensorrt_target_fails_at_once_without_gpu(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "build_engines.py"), "--target", "tensorrt",
                             "--model-repository", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert all(word in lines[0] for word in ("GPU", "CUDA", "TensorRT"))
    assert not (tmp_path / "repo").exists()


def test_gpu_plans_are_built_from_the_newest_fp32_onnx(tmp_path):
    unet = tmp_path / "unet"
    for version, files, precision in ((1, ["model.onnx"], "fp32"), (2, ["model.onnx", "model_fp32.onnx"], "int8"),
                                      (3, ["model.plan"], "fp16")):
        (unet / str(version)).mkdir(parents=True)
        for name in files:
            (unet / str(version) / name).write_bytes(b"")
        (unet / str(version) / "model.json").write_text(json.dumps({"precision": precision, "threshold": 0.4}))
    path, meta = shipped_fp32_onnx(unet, "latest")
    assert path == unet / "2" / "model_fp32.onnx" and meta["source_version"] == 2 and meta["threshold"] == 0.4
    (unet / "2" / "model_fp32.onnx").unlink()  # an int8 model.onnx is never a plan's source
    assert shipped_fp32_onnx(unet, "latest")[0] == unet / "1" / "model.onnx"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_rebuilding_a_shipped_version_on_a_copy_serves_its_masks(tmp_path, precision):
    """`build_engines.py --target cpu` on a copy of the model repository whose newest version is the newest one of
    `precision`: the new version serves the shipped masks, in process and through Triton: fp32 exactly; int8
    (v2, quantized with its calibration cache, gated on ../shared's val photos) within the int8 tolerance."""
    from tests.conftest import infer, make_client, start_server, stop_server
    if precision == "int8" and not be.DEFAULT_MANIFEST.is_file():
        pytest.skip(f"the int8 gate needs the data manifest {be.DEFAULT_MANIFEST}")
    repository = tmp_path / "model_repository"
    shutil.copytree(REPO_ROOT / "model_repository", repository, ignore=shutil.ignore_patterns("__pycache__"))
    unet = repository / "unet"
    shipped = [v for v in versions(unet)
               if json.loads((unet / str(v) / "model.json").read_text())["precision"] == precision][-1]
    for v in versions(unet):
        if v > shipped:
            shutil.rmtree(unet / str(v))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "build_engines.py"), "--target", "cpu",
                             "--model-repository", str(repository)], capture_output=True, text=True, timeout=900,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    new = unet / str(shipped + 1)
    meta = json.loads((new / "model.json").read_text())
    same = meta["parity"][f"served_masks_vs_version_{shipped}"]
    assert meta["precision"] == precision and same["passed"] and same["photos"] == len(SAMPLES)
    assert read_identity(new / "model.onnx") == (shipped + 1, read_identity(unet / str(shipped) / "model.onnx")[1])
    if precision == "int8":  # the shipped version's scales, exactly
        assert meta["int8"]["calibration_source"] == f"calibration cache of version {shipped} ({CACHE_FILE})"
        assert cache_from_qdq_graph(new / "model.onnx") == read_cache(unet / str(shipped) / CACHE_FILE)

    expected = served_outputs(unet / str(shipped) / "model.onnx", SAMPLES, c.WORKING_SIZE)
    got = served_outputs(new / "model.onnx", SAMPLES, c.WORKING_SIZE)
    for (mask0, prob0), (mask1, prob1) in zip(expected, got):
        figures = photo_difference(mask0, mask1, prob0, prob1)
        assert served_difference_reason(figures, SERVED_TOLERANCE[precision]) is None, figures

    server = start_server(tmp_path, repository)  # serves the newest version: the rebuilt one
    try:
        answer = infer(make_client(server, "grpc"), "grpc", [p.read_bytes() for p in SAMPLES])
        for i, (mask1, prob1) in enumerate(got):
            served = cv2.imdecode(np.frombuffer(answer.as_numpy(c.MASK)[i, 0], np.uint8), cv2.IMREAD_UNCHANGED)
            figures = photo_difference(mask1, served, prob1, prob1)  # the mask only (its probabilities: in process)
            assert (figures["differing_pixels"] == 0 if precision == "fp32" else
                    figures["dice"] >= SERVED_TOLERANCE["int8"].min_dice), figures
            assert json.loads(answer.as_numpy(c.LESIONS)[i, 0])["model"]["version"] == str(shipped + 1)
    finally:
        assert stop_server(server) == 0
