#!/usr/bin/env python3
"""Build a new `unet` version folder for Triton from a training checkpoint: ONNX (CPU) or a TensorRT plan (GPU).

    python build_engines.py --target cpu [--model-repository model_repository] [--checkpoint CKPT]
                            [--version N] [--int8 | --precision {auto,fp32,int8}] [--manifest CSV]
    python build_engines.py --target tensorrt [--checkpoint CKPT | --onnx PATH|latest] [--strongly-typed]

Checkpoint: by default the one behind the newest shipped version (its model.json's "checkpoint", a path inside
checkpoints/). Steps, each of which stops the build (exit 2, one line on stderr) when it fails:

  cpu       export ONNX (dynamic batch, I/O names of config.pbtxt) -> onnx.checker -> ONNX Runtime vs PyTorch
            through Polygraphy's Comparator on real preprocessed photos (samples/*.jpg; FP32 tolerances below)
            -> with --int8: static QDQ quantization (per-channel weights) calibrated on *training* photos of
            the manifest, evaluated against FP32 on `val` with training.evaluate; shipped only if the val pixel
            AUPR drops by at most --int8-max-aupr-drop (0.01), else FP32 is shipped and the figures recorded.
            Rebuilding the newest version's checkpoint keeps its precision and must serve the same masks.
  tensorrt  needs an NVIDIA GPU, CUDA and TensorRT. FP16 plan built with Polygraphy (optimisation profile
            batch 1..max_batch_size): TensorRT 10 uses the fp16 builder flag; TensorRT 11 (no such flag) or
            --strongly-typed builds a strongly typed network from an FP16 ONNX (I/O kept FP32). Compared with
            ONNX Runtime FP32 through Polygraphy, then config.pbtxt becomes platform "tensorrt_plan".

The version folder is assembled under unet/.building-N and renamed to unet/N only once every check passed,
so Triton never sees half a version. model.json = training.export.model_metadata + precision + build + parity.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
CHECKPOINTS = REPO_ROOT / "checkpoints"
SAMPLES = REPO_ROOT / "samples"
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "idrid_he" / "manifest.csv"
MODEL_NAME = "unet"
INPUT_NAME, OUTPUT_NAME = "PIXELS", "PROBABILITY"  # = training.export's (checked there), without importing torch

# Parity tolerances on probabilities in [0, 1], element-wise over whole [N, 1, S, S] maps.
FP32_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}  # ONNX Runtime FP32 vs PyTorch FP32: only op-order rounding
FP16_TOLERANCE = {"max_atol": 0.05, "mean_atol": 2e-3}  # TensorRT FP16 vs ONNX Runtime FP32
INT8_MAX_AUPR_DROP = 0.01

MODEL_PY = ("# This version runs model.onnx (beside this file) on ONNX Runtime; the logic is shared by all versions.\n"
            "from onnxruntime_model import TritonPythonModel  # noqa: F401\n")


class BuildError(Exception):
    """A build that must stop; the message is one line for the operator."""


# ----------------------------------------------------------------------------------------------------------------
# config.pbtxt


def unet_config(target: str, working_size: int, max_batch_size: int = 16, *, max_queue_delay_us: int = 2000,
                intra_op_threads: int = 2, instances: int = 1) -> str:
    """config.pbtxt of the `unet` model: Python backend + ONNX Runtime (cpu) or a TensorRT plan (tensorrt).

    Same name, I/O names, types and dims, batching and version policy for both, so the ensemble and the
    pre/postprocess models are unchanged whichever variant the repository holds.
    """
    if target not in ("cpu", "tensorrt"):
        raise ValueError(f"unknown target {target!r}")
    s = int(working_size)
    io = (f'input [\n  {{ name: "{INPUT_NAME}", data_type: TYPE_FP32, dims: [ 3, {s}, {s} ] }}\n]\n'
          f'output [\n  {{ name: "{OUTPUT_NAME}", data_type: TYPE_FP32, dims: [ 1, {s}, {s} ] }}\n]\n'
          "version_policy: { latest { num_versions: 1 } }\n"
          f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n")
    if target == "cpu":
        return ("# U-Net on the CPU: ONNX Runtime inside the Python backend (the pip-installed Triton has no "
                "onnxruntime\n# backend). build_engines.py --target tensorrt writes the GPU variant of this file "
                "(platform tensorrt_plan).\n"
                f'name: "{MODEL_NAME}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n' + io
                + f"instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]\n"
                'parameters { key: "onnx_file", value: { string_value: "model.onnx" } }\n'
                f'parameters {{ key: "intra_op_threads", value: {{ string_value: "{intra_op_threads}" }} }}\n')
    return ("# U-Net on the GPU: a TensorRT FP16 plan (model.plan), written by build_engines.py --target tensorrt.\n"
            "# Plans are specific to the GPU model and the TensorRT version: build them where they run.\n"
            f'name: "{MODEL_NAME}"\nplatform: "tensorrt_plan"\nmax_batch_size: {max_batch_size}\n'
            'default_model_filename: "model.plan"\n' + io
            + f"instance_group [ {{ kind: KIND_GPU, count: {instances} }} ]\n")


def read_config(text: str) -> dict:
    """The few fields of a unet config.pbtxt that a build must agree with (a regex reader, no protobuf)."""
    def tensor_dims(name: str) -> list[int] | None:
        m = re.search(r'name:\s*"' + name + r'"[^}]*?dims:\s*\[([^\]]*)\]', text)
        return [int(v) for v in m.group(1).replace(",", " ").split()] if m else None

    platform_ = re.search(r'^\s*platform:\s*"([^"]+)"', text, re.M)
    backend = re.search(r'^\s*backend:\s*"([^"]+)"', text, re.M)
    batch = re.search(r"^\s*max_batch_size:\s*(\d+)", text, re.M)
    kind = "tensorrt" if platform_ and platform_.group(1) == "tensorrt_plan" else (
        "cpu" if backend and backend.group(1) == "python" else "other")
    return {"target": kind, "max_batch_size": int(batch.group(1)) if batch else 0,
            "input_dims": tensor_dims(INPUT_NAME), "output_dims": tensor_dims(OUTPUT_NAME)}


# ----------------------------------------------------------------------------------------------------------------
# repository and checkpoint resolution


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())


def version_metadata(model_dir: Path, version: int) -> dict:
    try:
        return json.loads((model_dir / str(version) / "model.json").read_text())
    except (OSError, ValueError):
        return {}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_checkpoint(model_dir: Path, checkpoints: Path) -> Path:
    """The checkpoint behind the newest shipped version: its model.json "checkpoint", relative to checkpoints/."""
    shipped = versions(model_dir)
    if not shipped:
        raise BuildError(f"{model_dir} has no version yet: pass --checkpoint")
    name = version_metadata(model_dir, shipped[-1]).get("checkpoint")
    if not name:
        raise BuildError(f"{model_dir}/{shipped[-1]}/model.json names no checkpoint: pass --checkpoint")
    path = checkpoints / name
    if not path.is_file():
        raise BuildError(f"version {shipped[-1]} was built from checkpoint '{name}', which is not in "
                         f"{checkpoints}: put it there or pass --checkpoint")
    return path


def checkpoint_name(checkpoint: Path, checkpoints: Path) -> str:
    """What model.json records: the path inside checkpoints/ (how later builds find it), else the file name."""
    try:
        return checkpoint.resolve().relative_to(checkpoints.resolve()).as_posix()
    except ValueError:
        return checkpoint.name


def is_newest_checkpoint(model_dir: Path, checkpoint: Path, checkpoints: Path) -> tuple[int, dict] | None:
    """(version, metadata) of the newest shipped version if it was built from this very checkpoint."""
    shipped = versions(model_dir)
    if not shipped:
        return None
    meta = version_metadata(model_dir, shipped[-1])
    recorded = meta.get("build", {}).get("checkpoint_sha256")
    if recorded:
        same = recorded == sha256(checkpoint)
    else:
        candidate = checkpoints / str(meta.get("checkpoint", ""))
        same = bool(meta.get("checkpoint")) and candidate.is_file() and candidate.resolve() == checkpoint.resolve()
    return (shipped[-1], meta) if same else None


def check_repository_dims(repo: Path, working_size: int) -> dict | None:
    """The unet config (if any) and the preprocess model must agree with the model's working size."""
    expected = [3, working_size, working_size]
    pre = repo / "preprocess" / "config.pbtxt"
    if pre.is_file():
        dims = read_config(pre.read_text())["input_dims"]  # PIXELS is an output there
        if dims and dims != expected:
            raise BuildError(f"the model works at {working_size} px but {pre} produces PIXELS {dims}")
    cfg = repo / MODEL_NAME / "config.pbtxt"
    if not cfg.is_file():
        return None
    current = read_config(cfg.read_text())
    if current["input_dims"] and current["input_dims"] != expected:
        raise BuildError(f"the model works at {working_size} px but {cfg} serves PIXELS {current['input_dims']}: "
                         "the working size of a model repository is fixed")
    return current


# ----------------------------------------------------------------------------------------------------------------
# data: real preprocessed photographs


def preprocessed(photo: Path, working_size: int):
    from fundus_hemorrhage.preprocessing import PreprocessConfig, preprocess
    return preprocess(Path(photo).read_bytes(), PreprocessConfig(working_size=working_size))


def parity_feeds(photos: list[Path], working_size: int) -> list[OrderedDict]:
    """Polygraphy data: one batch of 1 photo, then one of 2 (when there are two), to exercise the batch axis."""
    import numpy as np
    if not photos:
        raise BuildError("no photographs for the parity check (samples/*.jpg, or --parity-images)")
    pixels = [preprocessed(p, working_size).pixels for p in photos]
    batches = [pixels[:1]] + ([pixels[1:3]] if len(pixels) > 1 else [])
    return [OrderedDict([(INPUT_NAME, np.stack(b))]) for b in batches]


def manifest_photos(manifest: Path, split: str) -> list[Path]:
    """Photos of a split, the full-size camera photos (what is served) before the 512 px letterboxed copies."""
    from training.data import read_manifest
    rows = [r for r in read_manifest(manifest) if r.split == split]
    rows.sort(key=lambda r: (r.label_quality.startswith("lossy"), r.id))
    return [r.image for r in rows]


class PhotoCalibrationReader:
    """onnxruntime.quantization CalibrationDataReader over photos preprocessed exactly as served."""

    def __init__(self, photos: list[Path], working_size: int, input_name: str = INPUT_NAME):
        self.photos, self.working_size, self.input_name = list(photos), working_size, input_name
        self._cache: dict[int, object] = {}
        self._next = 0

    def get_next(self) -> dict | None:
        if self._next >= len(self.photos):
            return None
        i, self._next = self._next, self._next + 1
        if i not in self._cache:
            self._cache[i] = preprocessed(self.photos[i], self.working_size).pixels[None]
        return {self.input_name: self._cache[i]}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.photos)


def _as_calibration_reader(reader: PhotoCalibrationReader):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def rewind(self):
            reader.rewind()

    return Reader()


# ----------------------------------------------------------------------------------------------------------------
# parity through Polygraphy


def _polygraphy_quiet(verbose: bool) -> None:
    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.WARNING


def torch_runner_class():
    """A Polygraphy runner for a PyTorch module on the CPU (polygraphy's PytRunner moves inputs to CUDA)."""
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchCpuRunner(BaseRunner):
        def __init__(self, module, working_size: int, name: str = "pytorch-cpu"):
            super().__init__(name=name, prefix="pytorch-cpu-runner")
            self.module, self.working_size = module, working_size

        def activate_impl(self):
            self.module.eval()

        def get_input_metadata_impl(self):
            import numpy as np
            return TensorMetadata().add(INPUT_NAME, np.float32, (-1, 3, self.working_size, self.working_size))

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            with torch.no_grad():
                out = self.module(torch.from_numpy(feed_dict[INPUT_NAME])).numpy()
            self.inference_time = time.perf_counter() - start
            return OrderedDict([(OUTPUT_NAME, out)])

        def deactivate_impl(self):
            pass

    return TorchCpuRunner


def _difference_figures(results, reference: str, other: str) -> dict:
    import numpy as np
    diffs = [np.abs(a[OUTPUT_NAME].astype(np.float64) - b[OUTPUT_NAME].astype(np.float64))
             for a, b in zip(results[other], results[reference])]
    flat = np.concatenate([d.ravel() for d in diffs])
    return {"max_abs": float(flat.max()), "mean_abs": float(flat.mean()),
            "batches": [int(a[OUTPUT_NAME].shape[0]) for a in results[reference]], "pixels": int(flat.size)}


def compare_func(**tolerances):
    """Polygraphy's simple comparison (SimpleCompareFunc; CompareFunc.simple in releases before 0.53)."""
    from polygraphy import comparator
    simple = getattr(comparator, "SimpleCompareFunc", None)
    return simple(**tolerances) if simple is not None else comparator.CompareFunc.simple(**tolerances)


def compare_torch_onnxruntime(module, onnx_path: Path, feeds: list, working_size: int) -> dict:
    """PyTorch (reference) vs ONNX Runtime, FP32, element-wise within FP32_TOLERANCE; raises BuildError if not."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    build_session = SessionFromOnnx(str(onnx_path), providers=["cpu"])
    runners = [torch_runner_class()(module, working_size, name="pytorch-fp32"),
               OnnxrtRunner(build_session, name="onnxruntime-fp32")]
    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, compare_func=compare_func(**FP32_TOLERANCE))
    figures = _difference_figures(results, "pytorch-fp32", "onnxruntime-fp32")
    figures.update(reference="pytorch-fp32", candidate="onnxruntime-fp32", tolerance=FP32_TOLERANCE,
                   passed=bool(accuracy))
    if not accuracy:
        raise BuildError(f"ONNX Runtime disagrees with PyTorch beyond atol={FP32_TOLERANCE['atol']}, "
                         f"rtol={FP32_TOLERANCE['rtol']} (max |diff| {figures['max_abs']:.3g})")
    return figures


# ----------------------------------------------------------------------------------------------------------------
# ONNX


def export_checkpoint(checkpoint: Path, onnx_path: Path, working_size: int | None):
    """(module, ckpt, working size): the checkpoint's SegmentationExport graph exported as FP32 ONNX and checked."""
    import torch

    from training import export as export_mod
    from training.model import SegmentationExport

    assert (export_mod.INPUT_NAME, export_mod.OUTPUT_NAME) == (INPUT_NAME, OUTPUT_NAME)
    try:
        model, ckpt = export_mod.load_model(checkpoint)
    except Exception as exc:  # a damaged or foreign file: say which, not a traceback
        raise BuildError(f"cannot load checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from None
    size = int(working_size or (ckpt.get("config") or {}).get("working_size") or 640)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    export_mod.export_onnx(model, onnx_path, size)
    check_onnx(onnx_path)
    return SegmentationExport(model).eval(), ckpt, size


def check_onnx(path: Path) -> None:
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BuildError(f"onnx.checker rejects {path.name}: {str(exc).splitlines()[0]}") from None
    model = onnx.load(str(path), load_external_data=False)
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise BuildError(f"{path.name} has I/O {names}, config.pbtxt needs [{INPUT_NAME}] -> [{OUTPUT_NAME}]")
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise BuildError(f"{path.name}: the batch axis of {INPUT_NAME} is not dynamic")


def onnx_working_size(path: Path) -> int:
    import onnx
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


# Ops whose float inputs are all data (convert them all); for Resize, inputs 1 and 2 (roi, scales) stay FP32.
FP16_OPS = {"Conv", "ConvTranspose", "Relu", "LeakyRelu", "Sigmoid", "Add", "Sub", "Mul", "Div", "Concat",
            "MaxPool", "AveragePool", "BatchNormalization", "Identity", "Resize", "Constant", "Clip", "Tanh"}
FP32_INPUTS = {"Resize": (1, 2)}


def to_float16(model):
    """FP32 ONNX -> FP16 ONNX with FP32 I/O (Cast at both ends), for a strongly typed TensorRT network.

    The same job as onnxconverter-common's convert_float_to_float16(keep_io_types=True), with onnx alone and for
    the ops of this U-Net; anything else is refused rather than guessed at.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    unsupported = sorted({n.op_type for n in graph.node} - FP16_OPS)
    if unsupported:
        raise BuildError(f"FP16 conversion does not handle ops {unsupported}")
    keep32 = {n.input[i] for n in graph.node for i in FP32_INPUTS.get(n.op_type, ()) if i < len(n.input)}

    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep32:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("float16"), init.name))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in keep32:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype("float16")))

    casts_in, casts_out = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = value.name + "_fp16"
            for node in graph.node:
                node.input[:] = [inner if i == value.name else i for i in node.input]
            casts_in.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT16,
                                             name=value.name + "_to_fp16"))
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = value.name + "_fp16"
            for node in graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            casts_out.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT,
                                              name=value.name + "_to_fp32"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# INT8 (CPU)


def quantize_int8(fp32_onnx: Path, int8_onnx: Path, calibration: PhotoCalibrationReader) -> dict:
    """Static QDQ quantization: uint8 activations (MinMax calibration), per-channel int8 weights.

    The final Sigmoid stays FP32: its output is the probability map, whose small values (the haemorrhage tail
    that pixel AUPR ranks) an 8-bit output would flatten to multiples of 1/255.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    prepared = int8_onnx.with_name(int8_onnx.stem + "_prepared.onnx")
    # Shape inference + ORT graph optimisation first (folds e.g. Identity-shared biases into initializers,
    # so that every Conv gets an int32 bias and runs as one QLinearConv-like kernel).
    quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
    sigmoids = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Sigmoid"]
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # quantize_static's advice ("consider pre-processing") is followed above
    try:
        quantize_static(str(prepared), str(int8_onnx), _as_calibration_reader(calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=sigmoids)
    finally:
        logger.setLevel(level)
        prepared.unlink(missing_ok=True)
    check_onnx(int8_onnx)
    model = onnx.load(str(int8_onnx))
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    if not qdq:
        raise BuildError("quantize_static produced no QuantizeLinear/DequantizeLinear node")
    return {"format": "QDQ", "activations": "uint8 (MinMax)", "weights": "int8 per-channel",
            "excluded_nodes": sigmoids, "calibration_images": len(calibration), "qdq_nodes": qdq,
            "quantize_s": round(time.perf_counter() - started, 1)}


def latency_ms(onnx_path: Path, working_size: int, threads: int = 2, runs: int = 5) -> float:
    """Median ms for one photo (batch 1) on ONNX Runtime with `threads` intra-op threads, as served."""
    import numpy as np
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, working_size, working_size), dtype=np.float32)
    session.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: x})
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 1)


def evaluate_onnx(onnx_path: Path, manifest: Path, split: str, threshold: float, working_size: int,
                  threads: int = 2) -> dict:
    from fundus_hemorrhage.preprocessing import PreprocessConfig
    from training.evaluate import evaluate, onnx_predictor
    return evaluate(onnx_predictor(onnx_path, threads), manifest, split, threshold,
                    PreprocessConfig(working_size=working_size), progress=False)


def int8_variant(fp32_onnx: Path, int8_onnx: Path, manifest: Path, working_size: int, threshold: float,
                 calibration_images: int, max_drop: float, split: str = "val") -> dict:
    """Quantize, then measure both on `split` along the serving path; decide whether INT8 ships."""
    if not manifest.is_file():
        raise BuildError(f"--int8 needs the data manifest (calibration on train, check on {split}): "
                         f"{manifest} not found")
    train = manifest_photos(manifest, "train")[:calibration_images]
    if not train:
        raise BuildError(f"{manifest} has no train photos to calibrate on")
    quant = quantize_int8(fp32_onnx, int8_onnx, PhotoCalibrationReader(train, working_size))
    scores = {name: evaluate_onnx(path, manifest, split, threshold, working_size)
              for name, path in (("fp32", fp32_onnx), ("int8", int8_onnx))}
    keys = ("pixel_aupr", "dice", "lesion_sensitivity", "lesion_precision")
    figures = {name: {k: s.get(k) for k in keys} for name, s in scores.items()}
    for name, path in (("fp32", fp32_onnx), ("int8", int8_onnx)):
        figures[name]["latency_ms_batch1_2threads"] = latency_ms(path, working_size)
    drop = figures["fp32"]["pixel_aupr"] - figures["int8"]["pixel_aupr"]
    shipped = drop <= max_drop
    return {**quant, "split": split, "threshold": threshold, "images": scores["fp32"].get("images"),
            **figures, "pixel_aupr_drop": round(drop, 5), "max_aupr_drop": max_drop, "shipped": shipped,
            "decision": (f"int8 shipped: val pixel AUPR {figures['int8']['pixel_aupr']:.4f} vs fp32 "
                         f"{figures['fp32']['pixel_aupr']:.4f} (drop {drop:.4f} <= {max_drop})") if shipped else
                        (f"int8 NOT shipped, fp32 kept: val pixel AUPR {figures['int8']['pixel_aupr']:.4f} vs fp32 "
                         f"{figures['fp32']['pixel_aupr']:.4f} (drop {drop:.4f} > {max_drop})")}


def served_mask_difference(old_onnx: Path, new_onnx: Path, photos: list[Path], working_size: int,
                           threshold: float) -> dict:
    """Masks that the two models serve for the photos (full serving path), compared pixel by pixel."""
    import numpy as np
    import onnxruntime as ort

    from postprocess_backend import PostprocessConfig, find_lesions, min_lesion_area
    post = PostprocessConfig(threshold=threshold)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (old_onnx, new_onnx)]
    differing, total = 0, 0
    for photo in photos:
        pre = preprocessed(photo, working_size)
        masks = []
        for session in sessions:
            prob = session.run(None, {INPUT_NAME: pre.pixels[None]})[0][0]
            masks.append(find_lesions(prob, pre.geometry, post, min_lesion_area(pre.geometry, post, working_size))[0])
        differing += int(np.count_nonzero(masks[0] != masks[1]))
        total += masks[0].size
    return {"photos": len(photos), "differing_pixels": differing, "pixels": total, "threshold": threshold}


# ----------------------------------------------------------------------------------------------------------------
# TensorRT (GPU)


def require_tensorrt() -> str:
    """TensorRT's version, or BuildError (one line) when no GPU, CUDA driver or TensorRT is usable here."""
    import ctypes
    need = "--target tensorrt needs an NVIDIA GPU, the CUDA driver and TensorRT (python package tensorrt)"
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise BuildError(f"{need}: no CUDA driver (libcuda.so.1) on this machine, so no usable GPU") from None
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        raise BuildError(f"{need}: the CUDA driver finds no GPU")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(f"{need}: TensorRT is not installed ({exc})") from None
    return trt.__version__


def gpu_description() -> dict:
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        name = ctypes.create_string_buffer(256)
        major, minor, driver = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        cuda.cuDeviceGetName(name, 256, 0)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, 0)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, 0)
        cuda.cuDriverGetVersion(ctypes.byref(driver))
        return {"gpu": name.value.decode(), "compute_capability": f"{major.value}.{minor.value}",
                "cuda_driver": f"{driver.value // 1000}.{driver.value % 1000 // 10}"}
    except (OSError, AttributeError):
        return {}


def build_tensorrt_plan(fp32_onnx: Path, plan_path: Path, working_size: int, max_batch_size: int, opt_batch: int,
                        feeds: list, strongly_typed: bool | None = None, workdir: Path | None = None) -> dict:
    """FP16 plan with an optimisation profile over batch 1..max_batch_size, checked against ONNX Runtime FP32."""
    import tensorrt as trt
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import (CreateConfig, Profile, TrtRunner, engine_from_network,
                                        network_from_onnx_path, save_engine)
    from polygraphy.comparator import Comparator

    def shape(batch: int) -> tuple:
        return (batch, 3, working_size, working_size)

    profile = Profile().add(INPUT_NAME, min=shape(1), opt=shape(max(1, min(opt_batch, max_batch_size))),
                            max=shape(max_batch_size))
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    if strongly_typed is None:
        strongly_typed = not has_fp16_flag  # TensorRT 11 dropped the flag: precision comes from the ONNX types
    if strongly_typed:
        import onnx
        fp16_onnx = (workdir or plan_path.parent) / "model_fp16.onnx"
        onnx.save(to_float16(onnx.load(str(fp32_onnx))), str(fp16_onnx))
        network = network_from_onnx_path(str(fp16_onnx), strongly_typed=True)
        config = CreateConfig(profiles=[profile])
        mode = "strongly typed network from an FP16 ONNX (FP32 I/O)"
    else:
        network = network_from_onnx_path(str(fp32_onnx))
        config = CreateConfig(fp16=True, profiles=[profile])
        mode = "FP32 ONNX with the fp16 builder flag"
    started = time.perf_counter()
    try:
        engine = engine_from_network(network, config=config)
    except Exception as exc:  # Polygraphy reports a failed parse or build as an exception, after TensorRT's log
        raise BuildError(f"TensorRT could not build the plan ({mode}): {str(exc).strip().splitlines()[-1]}") from None
    if engine is None:
        raise BuildError(f"TensorRT could not build the plan ({mode}): see its log above")
    save_engine(engine, path=str(plan_path))
    build_s = time.perf_counter() - started

    runners = [OnnxrtRunner(SessionFromOnnx(str(fp32_onnx), providers=["cpu"]), name="onnxruntime-fp32"),
               TrtRunner(engine, name="tensorrt-fp16")]
    results = Comparator.run(runners, data_loader=feeds)
    max_ok = Comparator.compare_accuracy(results, compare_func=compare_func(
        atol=FP16_TOLERANCE["max_atol"], rtol=0.0, check_error_stat="max"))
    mean_ok = Comparator.compare_accuracy(results, compare_func=compare_func(
        atol=FP16_TOLERANCE["mean_atol"], rtol=0.0, check_error_stat="mean"))
    figures = _difference_figures(results, "onnxruntime-fp32", "tensorrt-fp16")
    figures.update(reference="onnxruntime-fp32", candidate="tensorrt-fp16", tolerance=FP16_TOLERANCE,
                   passed=bool(max_ok) and bool(mean_ok))
    if not figures["passed"]:
        raise BuildError(f"TensorRT FP16 disagrees with ONNX Runtime FP32: max |diff| {figures['max_abs']:.3g} "
                         f"(limit {FP16_TOLERANCE['max_atol']}), mean {figures['mean_abs']:.3g} "
                         f"(limit {FP16_TOLERANCE['mean_atol']})")
    return {"mode": mode, "strongly_typed": bool(strongly_typed), "build_s": round(build_s, 1),
            "profile": {"min": shape(1), "opt": shape(max(1, min(opt_batch, max_batch_size))),
                        "max": shape(max_batch_size)}, "parity": figures}


def shipped_fp32_onnx(model_dir: Path, spec: str) -> tuple[Path, dict]:
    """--onnx PATH, or 'latest': the FP32 ONNX of the newest version that has one, with its model.json."""
    if spec != "latest":
        path = Path(spec)
        if not path.is_file():
            raise BuildError(f"--onnx {spec}: no such file")
        meta_path = path.parent / "model.json"
        return path, json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    for version in reversed(versions(model_dir)):
        folder, meta = model_dir / str(version), version_metadata(model_dir, version)
        if (folder / "model_fp32.onnx").is_file():
            return folder / "model_fp32.onnx", {**meta, "source_version": version}
        if (folder / "model.onnx").is_file() and meta.get("precision", "fp32") == "fp32":
            return folder / "model.onnx", {**meta, "source_version": version}
    raise BuildError(f"--onnx latest: no version of {model_dir} has an FP32 ONNX")


# ----------------------------------------------------------------------------------------------------------------
# the build


def json_clean(value):
    """Strict JSON: NaN/inf (e.g. lesion precision with no lesion predicted) become null, tuples lists."""
    if isinstance(value, dict):
        return {k: json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return json_clean(value.item())
    return value


def package_versions(*names: str) -> dict:
    from importlib import metadata
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_commit() -> str | None:
    try:
        from training.common import git_commit as commit
        return commit()
    except Exception:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["cpu", "tensorrt"], required=True)
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--checkpoint", type=Path, help="default: the checkpoint of the newest shipped version")
    p.add_argument("--checkpoints-dir", type=Path, default=CHECKPOINTS,
                   help="where model.json's checkpoint names are looked up (default: checkpoints/)")
    p.add_argument("--onnx", help="tensorrt: build from this FP32 ONNX (or 'latest' shipped) instead of a checkpoint")
    p.add_argument("--version", type=int, help="version folder to write (default: the next number)")
    p.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto",
                   help="cpu: auto = the newest version's precision when rebuilding its checkpoint, else fp32")
    p.add_argument("--int8", action="store_true", help="cpu: same as --precision int8")
    p.add_argument("--working-size", type=int, help="default: the checkpoint's training working size (640)")
    p.add_argument("--max-batch-size", type=int, help="default: the current config.pbtxt's, else 16")
    p.add_argument("--opt-batch", type=int, default=4, help="tensorrt: batch size the profile optimises for")
    p.add_argument("--strongly-typed", action="store_true",
                   help="tensorrt: FP16 ONNX + strongly typed network even where the fp16 flag exists")
    p.add_argument("--parity-images", type=Path, nargs="+", help="photos for the parity checks (samples/*.jpg)")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="int8: calibration (train) and check (val)")
    p.add_argument("--calibration-images", type=int, default=16, help="int8: training photos to calibrate on")
    p.add_argument("--int8-max-aupr-drop", type=float, default=INT8_MAX_AUPR_DROP)
    p.add_argument("--verbose", action="store_true", help="Polygraphy's own log too")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> dict:
    trt_version = require_tensorrt() if args.target == "tensorrt" else None  # before any slow import
    if args.onnx and args.target != "tensorrt":
        raise BuildError("--onnx is for --target tensorrt; the cpu target exports from a checkpoint")
    repo = args.model_repository.resolve()
    model_dir = repo / MODEL_NAME
    shipped = versions(model_dir)
    version = args.version if args.version is not None else (shipped[-1] + 1 if shipped else 1)
    final_dir = model_dir / str(version)
    if final_dir.exists():
        raise BuildError(f"{final_dir} exists already: pick another --version")
    photos = args.parity_images or sorted(SAMPLES.glob("IDRiD_*[0-9].jpg"))
    _polygraphy_quiet(args.verbose)

    staging = model_dir / f".building-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix="build_engines-") as tmp:
            tmp = Path(tmp)
            meta, config = _build_into(args, repo, model_dir, staging, tmp, photos, trt_version)
        (staging / "model.json").write_text(json.dumps(json_clean(meta), indent=2, allow_nan=False) + "\n")
        staging.rename(final_dir)
        if config is not None:  # only once the version is complete
            (model_dir / "config.pbtxt").write_text(config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"version": version, "folder": str(final_dir), **meta}


def _build_into(args, repo: Path, model_dir: Path, staging: Path, tmp: Path, photos: list[Path],
                trt_version: str | None) -> tuple[dict, str | None]:
    checkpoint, module, ckpt, source_meta = None, None, None, {}
    fp32_onnx = tmp / "model_fp32.onnx"
    if args.onnx:
        src, source_meta = shipped_fp32_onnx(model_dir, args.onnx)
        shutil.copy2(src, fp32_onnx)
        check_onnx(fp32_onnx)
        working_size = onnx_working_size(fp32_onnx)
        if args.working_size and args.working_size != working_size:
            raise BuildError(f"--working-size {args.working_size} but {src} works at {working_size} px")
    else:
        checkpoint = args.checkpoint or default_checkpoint(model_dir, args.checkpoints_dir)
        if not checkpoint.is_file():
            raise BuildError(f"checkpoint {checkpoint} not found")
        print(f"build_engines: exporting {checkpoint}", flush=True)
        module, ckpt, working_size = export_checkpoint(checkpoint, fp32_onnx, args.working_size)

    current = check_repository_dims(repo, working_size)
    max_batch = args.max_batch_size or (current or {}).get("max_batch_size") or 16
    feeds = parity_feeds(photos, working_size)
    build_info = {"tool": "build_engines.py", "target": args.target,
                  "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "git_commit": git_commit(), "host": platform.node(), "working_size": working_size,
                  "max_batch_size": max_batch, "opset": None,
                  "packages": package_versions("torch", "onnx", "onnxruntime", "polygraphy", "tensorrt")}
    import onnx
    build_info["opset"] = next((o.version for o in onnx.load(str(fp32_onnx)).opset_import
                                if o.domain in ("", "ai.onnx")), None)
    if checkpoint is not None:
        build_info["checkpoint_sha256"] = sha256(checkpoint)

    parity = {}
    if module is not None:
        print("build_engines: comparing ONNX Runtime with PyTorch (Polygraphy)", flush=True)
        parity["onnxruntime_vs_pytorch"] = compare_torch_onnxruntime(module, fp32_onnx, feeds, working_size)

    if checkpoint is not None:
        from training.export import model_metadata
        name = checkpoint_name(checkpoint, args.checkpoints_dir)
        if "/" not in name and not (args.checkpoints_dir / name).is_file():
            print(f"build_engines: note: {checkpoint} is not in {args.checkpoints_dir}; ship it there as {name} "
                  "so that later builds can find it", flush=True)
        base = lambda precision: {**model_metadata(ckpt, checkpoint, precision), "checkpoint": name}  # noqa: E731
    else:
        keep = ("threshold", "stage", "checkpoint", "model_config", "git_commit", "manifest_sha256", "trained",
                "val_metrics")
        base = lambda precision: {**{k: source_meta.get(k) for k in keep}, "precision": precision,  # noqa: E731
                                  "source_version": source_meta.get("source_version")}
        build_info["checkpoint_sha256"] = source_meta.get("build", {}).get("checkpoint_sha256")
    threshold = float((ckpt or source_meta).get("threshold", 0.5))

    if args.target == "tensorrt":
        build_info.update(tensorrt=trt_version, **gpu_description())
        print(f"build_engines: building the TensorRT {trt_version} FP16 plan", flush=True)
        trt = build_tensorrt_plan(fp32_onnx, staging / "model.plan", working_size, max_batch, args.opt_batch, feeds,
                                  strongly_typed=True if args.strongly_typed else None, workdir=tmp)
        parity["tensorrt_vs_onnxruntime"] = trt.pop("parity")
        build_info.update(tensorrt_build=trt, plan_sha256=sha256(staging / "model.plan"))
        return {**base("fp16"), "build": build_info, "parity": parity}, unet_config("tensorrt", working_size, max_batch)

    # cpu
    newest = is_newest_checkpoint(model_dir, checkpoint, args.checkpoints_dir)
    precision = "int8" if args.int8 else args.precision
    if precision == "auto":
        precision = "int8" if newest and newest[1].get("precision") == "int8" else "fp32"
    shipped_precision, int8 = "fp32", None
    if precision == "int8":
        print("build_engines: INT8 calibration on training photos, then val evaluation of FP32 and INT8", flush=True)
        int8 = int8_variant(fp32_onnx, tmp / "model_int8.onnx", args.manifest, working_size, threshold,
                            args.calibration_images, args.int8_max_aupr_drop)
        print(f"build_engines: {int8['decision']}", flush=True)
        if int8["shipped"]:
            shipped_precision = "int8"
            shutil.copy2(tmp / "model_int8.onnx", staging / "model.onnx")
            shutil.copy2(fp32_onnx, staging / "model_fp32.onnx")  # the source of GPU plans (--onnx latest)
    if shipped_precision == "fp32":
        shutil.copy2(fp32_onnx, staging / "model.onnx")
    (staging / "model.py").write_text(MODEL_PY)
    build_info["onnx_sha256"] = sha256(staging / "model.onnx")

    if newest:
        old = model_dir / str(newest[0]) / "model.onnx"
        if newest[1].get("precision", "fp32") == shipped_precision and old.is_file() and \
                onnx_working_size(old) == working_size:
            same = served_mask_difference(old, staging / "model.onnx", photos, working_size, threshold)
            parity[f"served_masks_vs_version_{newest[0]}"] = same
            if same["differing_pixels"]:
                raise BuildError(f"rebuilt version serves different masks than version {newest[0]} "
                                 f"({same['differing_pixels']} of {same['pixels']} pixels on {same['photos']} photos)")
            print(f"build_engines: same masks as version {newest[0]} on {same['photos']} photos", flush=True)

    if not (model_dir / "onnxruntime_model.py").is_file():
        shutil.copy2(REPO_ROOT / "model_repository" / MODEL_NAME / "onnxruntime_model.py", model_dir)
    meta = {**base(shipped_precision), "build": build_info, "parity": parity}
    if int8 is not None:
        meta["int8"] = int8
    # An existing CPU config stays as it is (hand-tuned threads, comments); else the generated one.
    keep_config = current is not None and current["target"] == "cpu"
    return meta, None if keep_config else unet_config("cpu", working_size, max_batch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = build(args)
    except BuildError as exc:
        print(f"build_engines.py: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"build_engines: wrote {result['folder']} ({result['precision']}, {args.target})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
