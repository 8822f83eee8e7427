"""INT8 for the CPU: static QDQ quantization with ONNX Runtime, and the gate that decides whether it ships.

The gate measures both graphs as they would be served: each version-folder graph (with its THRESHOLD and
MODEL_VERSION) runs on onnx_session.create_session's options through fundus_hemorrhage_training.evaluate (the
serving path of fundus_hemorrhage.pipeline, scored at full resolution). INT8 ships only if the val pixel AUPR
drops by at most `max_aupr_drop` (default 0.01 AUPR, absolute; v2 measured a 0.0016 drop). Which photos
calibrate, their record in model.json and the calibration cache a rebuild quantises with: engines.calibration.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.onnx_session import SERVING_THREADS, create_session, run
from fundus_hemorrhage.pipeline import onnx_model
from fundus_hemorrhage.preprocessing import ImageError, PreprocessConfig, preprocess
from . import BuildError
from .calibration import cache_differences, cache_from_qdq_graph
from .export import check_onnx

INT8_MAX_AUPR_DROP = 0.01


class PhotoCalibrationReader(CalibrationDataReader):
    """Calibration data: photos preprocessed as `config` says (default: as served at `working_size`), one at a
    time as PIXELS [1, 3, S, S]. All are preprocessed up front (16 photos at 640 px: 79 MB), so that an unreadable
    or ungradable photo stops the build with its name instead of calibrating on zeros."""

    def __init__(self, photos: list[Path], working_size: int, config: PreprocessConfig | None = None):
        config = config or PreprocessConfig(working_size=working_size)
        if config.working_size != working_size:
            raise BuildError(f"calibration preprocessing works at {config.working_size} px, the model at "
                             f"{working_size}")
        self.photos, self.working_size = list(photos), working_size
        self._pixels = [self._preprocess(Path(p), config) for p in self.photos]
        self._next = 0

    @staticmethod
    def _preprocess(photo: Path, config: PreprocessConfig) -> np.ndarray:
        try:
            pre = preprocess(photo.read_bytes(), config)
        except (OSError, ImageError) as exc:
            raise BuildError(f"calibration photo {photo}: {exc}") from None
        if not pre.quality.gradable:
            raise BuildError(f"calibration photo {photo} is ungradable ({', '.join(pre.quality.reasons)}): "
                             "its pixels would be all zero")
        return pre.pixels[None]

    def get_next(self) -> dict | None:
        if self._next >= len(self._pixels):
            return None
        self._next += 1
        return {c.PIXELS: self._pixels[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.photos)


def calibrated_tensors(model: onnx.ModelProto) -> set[str]:
    """The tensors ONNX Runtime's calibrator measures in a (shape-inferred) graph: every float input or output
    of a node that is not an initializer (onnxruntime.quantization.calibrate's select_tensors_to_calibrate)."""
    infos = {v.name: v for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    weights = {i.name for i in model.graph.initializer}
    return {name for node in model.graph.node for name in (*node.input, *node.output)
            if name in infos and name not in weights and infos[name].type.HasField("tensor_type")
            and infos[name].type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def _cache_arguments(prepared: Path, cache: dict[str, dict], workdir: Path) -> dict:
    """quantize_static's arguments that quantise with `cache`'s scales and zero points instead of calibrating.

    ONNX Runtime's own calibration cache (calibration_cache_path: the MinMax range of each calibrated tensor)
    stands in for the calibration run: the range of a cached tensor is the one its scale and zero point
    represent, [-zp * s, (255 - zp) * s]; the other calibrated tensors (the input of a Relu, which takes its
    output's range; the FP32 Sigmoid) get [0, 0], which no quantised tensor may end up with. Ranges alone would
    not give the scales back exactly (they are recomputed in float32), so TensorQuantOverrides pins every cached
    tensor's scale and zero point; quantize_int8 then checks the graph's QDQ parameters against the cache."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
    calibrated = calibrated_tensors(onnx.shape_inference.infer_shapes(onnx.load(str(prepared))))
    foreign = [name for name in cache if name not in calibrated]
    if foreign:
        raise BuildError(f"the calibration cache names {len(foreign)} tensor(s) this graph does not have "
                         f"({', '.join(foreign[:3])}): it is another model's or export's; --recalibrate")
    ranges = {}
    for name in sorted(calibrated):
        low = high = np.float32(0.0)
        if name in cache:
            scale, zero = np.float32(cache[name]["scale"]), int(cache[name]["zero_point"])
            low, high = np.float32(-zero) * scale, np.float32(255 - zero) * scale
        ranges[name] = TensorData(lowest=np.array(low, np.float32), highest=np.array(high, np.float32))
    path = workdir / "onnxruntime_calibration_ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), path)
    overrides = {name: [{"scale": np.array(e["scale"], np.float32), "zero_point": np.array(e["zero_point"], np.uint8)}]
                 for name, e in cache.items()}
    return {"calibration_cache_path": str(path), "extra_options": {"TensorQuantOverrides": overrides}}


def quantize_int8(fp32_onnx: Path, int8_onnx: Path, calibration: PhotoCalibrationReader | None = None,
                  cache: dict[str, dict] | None = None) -> dict:
    """Static QDQ quantization of a PIXELS -> PROBABILITY graph: uint8 activations, per-channel int8 weights.
    The activations' scales and zero points come from MinMax calibration on `calibration`'s photos, or, given
    `cache` (engines.calibration: {tensor: {"scale", "zero_point"}}), are exactly the cache's; BuildError if the
    quantised graph's are not (cache_differences), or if nothing was quantized. Returns the figures for
    model.json's "int8".

    The final Sigmoid stays FP32: its output is the probability map, whose small values (the haemorrhage tail
    that pixel AUPR ranks) an 8-bit output would flatten to multiples of 1/255.
    """
    if (calibration is None) == (cache is None):
        raise ValueError("quantize_int8 needs calibration photos or a calibration cache, not both")
    started = time.perf_counter()
    prepared = int8_onnx.with_name(int8_onnx.stem + "_prepared.onnx")
    # Shape inference + ORT graph optimisation first (folds e.g. Identity-shared biases into initializers,
    # so that every Conv gets an int32 bias and runs as one QLinearConv-like kernel).
    quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
    sigmoids = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Sigmoid"]
    from_cache = _cache_arguments(prepared, cache, int8_onnx.parent) if cache is not None else {}
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # quantize_static's advice ("consider pre-processing") is followed above
    try:
        quantize_static(str(prepared), str(int8_onnx), calibration, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=sigmoids, **from_cache)
    finally:
        logger.setLevel(level)
        prepared.unlink(missing_ok=True)
        if from_cache:
            Path(from_cache["calibration_cache_path"]).unlink(missing_ok=True)
    check_onnx(int8_onnx)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(int8_onnx)).graph.node)
    if not qdq:
        raise BuildError("quantize_static produced no QuantizeLinear/DequantizeLinear node")
    scales = cache_from_qdq_graph(int8_onnx)
    if cache is not None:
        differences = cache_differences(cache, scales)
        if differences:
            raise BuildError(f"quantising with the calibration cache gave other activation scales than the cache's "
                             f"({len(differences)}): {'; '.join(differences[:3])}")
    return {"format": "QDQ", "activations": "uint8 (MinMax)", "weights": "int8 per-channel",
            "excluded_nodes": sigmoids, "qdq_nodes": qdq, "activation_scales": len(scales),
            **({"calibration_images": len(calibration)} if calibration is not None else {}),
            "quantize_s": round(time.perf_counter() - started, 1)}


def latency_ms(onnx_path: Path, working_size: int, threads: int = SERVING_THREADS, runs: int = 5) -> float:
    """Median ms for one photo (batch 1) on the serving session with `threads` intra-op threads."""
    session = create_session(onnx_path, threads)
    x = np.random.default_rng(0).random((1, 3, working_size, working_size), dtype=np.float32)
    run(session, x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(session, x)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 1)


def evaluate_onnx(onnx_path: Path, manifest: Path, split: str, threshold: float, working_size: int) -> dict:
    """fundus_hemorrhage_training.evaluate's full-resolution scores of a graph on the serving session options."""
    from fundus_hemorrhage_training.evaluate import evaluate
    return evaluate(onnx_model(onnx_path), manifest, split, threshold, PreprocessConfig(working_size=working_size),
                    progress=False)


def calibrate(fp32_onnx: Path, int8_onnx: Path, photos: list[tuple[str, Path]] | None, working_size: int,
              calibration: dict, cache: dict[str, dict] | None = None) -> tuple[dict, dict[str, dict]]:
    """Quantize `fp32_onnx` (PIXELS -> PROBABILITY) with the calibration cache `cache`, or else calibrated on
    `photos` ((id, path)) preprocessed with `calibration["preprocessing"]` (engines.plan). Returns (model.json's
    "int8" with `calibration`, the record of engines.calibration, and its calibration_manifest_sha256; the
    calibration cache of the quantised graph, engines.calibration.cache_from_qdq_graph)."""
    if cache is not None:
        info = quantize_int8(fp32_onnx, int8_onnx, cache=cache)
    else:
        from .plan import preprocess_config
        try:
            config = preprocess_config(calibration["preprocessing"])
        except (KeyError, ValueError) as exc:
            raise BuildError(f"calibration preprocessing: {exc}") from None
        info = quantize_int8(fp32_onnx, int8_onnx, PhotoCalibrationReader([path for _, path in photos], working_size,
                                                                          config))
    info["calibration_images"] = len(calibration.get("photos") or [])  # the photos behind the scales
    return ({**info, "calibration_manifest_sha256": calibration.get("manifest_sha256"), "calibration": calibration},
            cache_from_qdq_graph(int8_onnx))


def int8_gate(fp32_onnx: Path, int8_onnx: Path, manifest: Path, working_size: int, threshold: float,
              max_aupr_drop: float = INT8_MAX_AUPR_DROP, split: str = "val") -> dict:
    """Both graphs (as they would be served) scored on `split` at `threshold`; "shipped": whether INT8 ships."""
    keys = ("pixel_aupr", "dice", "lesion_sensitivity", "lesion_precision")
    figures, images = {}, None
    for name, path in (("fp32", fp32_onnx), ("int8", int8_onnx)):
        scores = evaluate_onnx(path, manifest, split, threshold, working_size)
        images = scores.get("images")
        figures[name] = {**{k: scores.get(k) for k in keys},
                         f"latency_ms_batch1_{SERVING_THREADS}threads": latency_ms(path, working_size)}
    drop = figures["fp32"]["pixel_aupr"] - figures["int8"]["pixel_aupr"]
    shipped = drop <= max_aupr_drop
    comparison = (f"val pixel AUPR {figures['int8']['pixel_aupr']:.4f} vs fp32 {figures['fp32']['pixel_aupr']:.4f} "
                  f"(drop {drop:.4f} {'<=' if shipped else '>'} {max_aupr_drop})")
    return {"split": split, "threshold": threshold, "images": images, **figures, "pixel_aupr_drop": round(drop, 5),
            "max_aupr_drop": max_aupr_drop, "shipped": shipped,
            "decision": f"int8 shipped: {comparison}" if shipped else f"int8 NOT shipped, fp32 kept: {comparison}"}


def cpu_int8_isa() -> list[str]:
    """The int8 instruction sets of this CPU that ONNX Runtime's kernels choose between (Linux /proc/cpuinfo):
    recorded in model.json, since int8 rounding, and so a rebuild's masks, depend on them (parity module doc)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted({"amx_int8", "avx512_vnni", "avx_vnni", "avx2"} & set(flags))
