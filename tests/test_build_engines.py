"""build_engines.py on the CPU: export + Polygraphy parity, version folders, INT8, FP16 ONNX, config.pbtxt.

A tiny U-Net (made here, saved as a real checkpoint) works at 64 px so that everything runs in seconds; the
repositories are built in tmp_path (never in model_repository/). Photos are the committed samples.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import build_engines as be
from training.common import save_checkpoint
from training.model import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO_ROOT / "samples").glob("IDRiD_*[0-9].jpg"))
SIZE = 64


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


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


def test_config_generation_cpu_and_tensorrt():
    cpu = parse_config(be.unet_config("cpu", 640, 16))
    shipped = parse_config((REPO_ROOT / "model_repository" / "unet" / "config.pbtxt").read_text())
    assert cpu == shipped  # the generator reproduces the hand-written CPU config
    trt = parse_config(be.unet_config("tensorrt", 640, 8))
    assert trt.platform == "tensorrt_plan" and not trt.backend and trt.default_model_filename == "model.plan"
    assert trt.max_batch_size == 8 and trt.HasField("dynamic_batching")
    assert trt.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for config in (cpu, trt):
        assert config.name == "unet"
        assert [(t.name, list(t.dims), t.data_type) for t in config.input] == [("PIXELS", [3, 640, 640], 11)]
        assert [(t.name, list(t.dims), t.data_type) for t in config.output] == [("PROBABILITY", [1, 640, 640], 11)]
    assert be.read_config(be.unet_config("tensorrt", 96, 4)) == {
        "target": "tensorrt", "max_batch_size": 4, "input_dims": [3, 96, 96], "output_dims": [1, 96, 96]}
    with pytest.raises(ValueError):
        be.unet_config("tpu", 640)


def test_cpu_build_writes_a_consistent_version(built):
    unet = built / "unet"
    folder = unet / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.py"]
    assert (folder / "model.py").read_text() == be.MODEL_PY and (unet / "onnxruntime_model.py").is_file()
    meta = json.loads((folder / "model.json").read_text())
    assert meta["precision"] == "fp32" and meta["checkpoint"] == "tiny.pt" and meta["threshold"] == 0.5
    assert meta["model_config"]["channels"] == [4, 8, 8, 8, 8] and meta["build"]["working_size"] == SIZE
    parity = meta["parity"]["onnxruntime_vs_pytorch"]
    assert parity["passed"] and parity["batches"] == [1, 2] and parity["max_abs"] <= be.FP32_TOLERANCE["atol"]

    config = parse_config((unet / "config.pbtxt").read_text())  # a fresh repository gets a generated config
    assert config.backend == "python" and list(config.input[0].dims) == [3, SIZE, SIZE]
    model = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["PIXELS"] and [o.name for o in model.graph.output] == ["PROBABILITY"]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == list(config.input[0].dims)
    batch = np.zeros((3, 3, SIZE, SIZE), np.float32)
    out = ort.InferenceSession(str(folder / "model.onnx")).run(None, {"PIXELS": batch})
    assert out[0].shape == (3, 1, SIZE, SIZE)  # dynamic batch axis


def test_rebuild_of_newest_version_serves_the_same_masks(built, work):
    # no --checkpoint: the newest version's model.json names tiny.pt, looked up in the checkpoints folder
    assert be.main(["--target", "cpu", "--model-repository", str(built),
                    "--checkpoints-dir", str(work / "checkpoints")]) == 0
    meta = json.loads((built / "unet" / "2" / "model.json").read_text())
    assert meta["precision"] == "fp32"
    same = meta["parity"]["served_masks_vs_version_1"]
    assert same["differing_pixels"] == 0 and same["photos"] == len(SAMPLES)
    assert not list((built / "unet").glob(".building-*"))


def test_int8_qdq_model_is_valid_and_close_to_fp32(built, tmp_path):
    fp32 = built / "unet" / "1" / "model.onnx"
    reader = be.PhotoCalibrationReader(SAMPLES[:2], SIZE)
    info = be.quantize_int8(fp32, tmp_path / "int8.onnx", reader)
    model = onnx.load(str(tmp_path / "int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and info["qdq_nodes"] > 0
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    assert weights  # per-channel int8 weights
    x = np.stack([be.preprocessed(p, SIZE).pixels for p in SAMPLES])
    ref = ort.InferenceSession(str(fp32)).run(None, {"PIXELS": x})[0]
    got = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, {"PIXELS": x})[0]
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 0.02 and np.abs(got - ref).max() < 0.15


def test_int8_cli_ships_or_keeps_fp32_by_the_aupr_gate(built, work):
    common = ["--target", "cpu", "--model-repository", str(built), "--checkpoint",
              str(work / "checkpoints" / "tiny.pt"), "--int8", "--manifest", str(work / "manifest.csv"),
              "--calibration-images", "2"]
    assert be.main([*common, "--version", "10", "--int8-max-aupr-drop", "-1"]) == 0  # never good enough
    meta = json.loads((built / "unet" / "10" / "model.json").read_text())
    assert meta["precision"] == "fp32" and meta["int8"]["shipped"] is False
    assert not (built / "unet" / "10" / "model_fp32.onnx").exists()
    assert {"pixel_aupr", "latency_ms_batch1_2threads"} <= set(meta["int8"]["int8"]) and meta["int8"]["fp32"]

    assert be.main([*common, "--version", "11", "--int8-max-aupr-drop", "1"]) == 0
    meta = json.loads((built / "unet" / "11" / "model.json").read_text())
    assert meta["precision"] == "int8" and meta["int8"]["shipped"] is True
    assert (built / "unet" / "11" / "model_fp32.onnx").is_file()  # the source of GPU plans
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(built / "unet" / "11" / "model.onnx")).graph.node)


def test_fp16_onnx_keeps_fp32_io(built):
    fp32 = onnx.load(str(built / "unet" / "1" / "model.onnx"))
    fp16 = be.to_float16(fp32)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in (*fp16.graph.input, *fp16.graph.output)] == [f32, f32]
    assert {i.data_type for i in fp16.graph.initializer} == {f16}
    assert fp16.graph.node[0].op_type == "Cast" and fp16.graph.node[-1].op_type == "Cast"
    x = np.stack([be.preprocessed(p, SIZE).pixels for p in SAMPLES[:2]])
    ref = ort.InferenceSession(fp32.SerializeToString()).run(None, {"PIXELS": x})[0]
    got = ort.InferenceSession(fp16.SerializeToString()).run(None, {"PIXELS": x})[0]
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 0.01


def test_working_size_must_match_the_repository(work, tmp_path):
    repo = tmp_path / "repo"
    (repo / "unet").mkdir(parents=True)
    (repo / "unet" / "config.pbtxt").write_text(be.unet_config("cpu", 640))
    with pytest.raises(be.BuildError, match="640"):
        be.build(be.parse_args(["--target", "cpu", "--model-repository", str(repo),
                                "--checkpoint", str(work / "checkpoints" / "tiny.pt")]))
    assert not list((repo / "unet").glob("*1"))  # nothing half-written


def test_default_checkpoint_must_be_shipped(built, tmp_path, capsys):
    code = be.main(["--target", "cpu", "--model-repository", str(built), "--checkpoints-dir", str(tmp_path)])
    assert code == 2 and "not in" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None and importlib.util.find_spec("tensorrt") is not None,
                    reason="a GPU with TensorRT is present")
def test_tensorrt_target_fails_at_once_without_gpu(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "build_engines.py"), "--target", "tensorrt",
                             "--model-repository", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
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
    path, meta = be.shipped_fp32_onnx(unet, "latest")
    assert path == unet / "2" / "model_fp32.onnx" and meta["source_version"] == 2 and meta["threshold"] == 0.4
    (unet / "2" / "model_fp32.onnx").unlink()  # an int8 model.onnx is never a plan's source
    assert be.shipped_fp32_onnx(unet, "latest")[0] == unet / "1" / "model.onnx"
