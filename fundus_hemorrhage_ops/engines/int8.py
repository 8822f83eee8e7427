"""INT8 for the CPU: static QDQ quantization with ONNX Runtime, and the gate that decides whether it ships.

The gate measures both graphs as they would be served: each version-folder graph (with its THRESHOLD and
MODEL_VERSION) runs on onnx_session.create_session's options through fundus_hemorrhage_training.evaluate (the
serving path of fundus_hemorrhage.pipeline, scored at full resolution). INT8 ships only if the val pixel AUPR
drops by at most `max_aupr_drop` (default 0.01 AUPR, absolute; v2 measured a 0.0016 drop). Which photos
calibrate, and their record in model.json: engines.calibration.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.onnx_session import SERVING_THREADS, create_session, run
from fundus_hemorrhage.pipeline import onnx_model
from fundus_hemorrhage.preprocessing import ImageError, PreprocessConfig, preprocess
from . import BuildError
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


def quantize_int8(fp32_onnx: Path, int8_onnx: Path, calibration: PhotoCalibrationReader) -> dict:
    """Static QDQ quantization of a PIXELS -> PROBABILITY graph: uint8 activations (MinMax calibration),
    per-channel int8 weights. Returns the figures for model.json's "int8"; BuildError if nothing was quantized.

    The final Sigmoid stays FP32: its output is the probability map, whose small values (the haemorrhage tail
    that pixel AUPR ranks) an 8-bit output would flatten to multiples of 1/255.
    """
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
        quantize_static(str(prepared), str(int8_onnx), calibration, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=sigmoids)
    finally:
        logger.setLevel(level)
        prepared.unlink(missing_ok=True)
    check_onnx(int8_onnx)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(int8_onnx)).graph.node)
    if not qdq:
        raise BuildError("quantize_static produced no QuantizeLinear/DequantizeLinear node")
    return {"format": "QDQ", "activations": "uint8 (MinMax)", "weights": "int8 per-channel",
            "excluded_nodes": sigmoids, "calibration_images": len(calibration), "qdq_nodes": qdq,
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


def calibrate(fp32_onnx: Path, int8_onnx: Path, photos: list[tuple[str, Path]], working_size: int,
              calibration: dict) -> dict:
    """Quantize `fp32_onnx` (PIXELS -> PROBABILITY) calibrated on `photos` ((id, path)) preprocessed with
    `calibration["preprocessing"]` (engines.plan). Returns model.json's "int8" with `calibration` (the record of
    engines.calibration: what a rebuild needs to reproduce the scales) and its calibration_manifest_sha256."""
    from .plan import preprocess_config
    try:
        config = preprocess_config(calibration["preprocessing"])
    except (KeyError, ValueError) as exc:
        raise BuildError(f"calibration preprocessing: {exc}") from None
    reader = PhotoCalibrationReader([path for _, path in photos], working_size, config)
    return {**quantize_int8(fp32_onnx, int8_onnx, reader),
            "calibration_manifest_sha256": calibration.get("manifest_sha256"), "calibration": calibration}


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
