"""TensorRT FP16 plans for the GPU (Polygraphy), and the FP16 ONNX a strongly typed network is built from.

Needs an NVIDIA GPU, the CUDA driver and TensorRT; require_tensorrt() says in one line what is missing, before
anything slow runs. The plan is built from the version's FP32 ONNX, which already carries that version's
THRESHOLD and MODEL_VERSION outputs, so the plan serves them too.

FP16_TOLERANCE (TensorRT FP16 vs ONNX Runtime FP32, probabilities in [0, 1]): max |diff| 0.05, mean 2e-3, the
limits docs/gpu.md states (FP16 keeps an 11-bit mantissa; not re-measured on a GPU since the split). THRESHOLD and
MODEL_VERSION must be bit-identical: they decide the mask and name the version.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fundus_hemorrhage import contract as c
from . import BuildError
from .identity import add_identity, read_identity, strip_identity

FP16_TOLERANCE = {"max_atol": 0.05, "mean_atol": 2e-3}

# Ops whose float inputs are all data (convert them all); for Resize, inputs 1 and 2 (roi, scales) stay FP32.
FP16_OPS = {"Conv", "ConvTranspose", "Relu", "LeakyRelu", "Sigmoid", "Add", "Sub", "Mul", "Div", "Concat",
            "MaxPool", "AveragePool", "BatchNormalization", "Identity", "Resize", "Constant", "Clip", "Tanh"}
FP32_INPUTS = {"Resize": (1, 2)}

_NEED = "--target tensorrt needs an NVIDIA GPU, the CUDA driver and TensorRT (python package tensorrt)"


def require_tensorrt() -> str:
    """TensorRT's version, or BuildError (one line) when no GPU, CUDA driver or TensorRT is usable here."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise BuildError(f"{_NEED}: no CUDA driver (libcuda.so.1) on this machine, so no usable GPU") from None
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        raise BuildError(f"{_NEED}: the CUDA driver finds no GPU")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(f"{_NEED}: TensorRT is not installed ({exc})") from None
    return trt.__version__


def gpu_description() -> dict:
    """GPU 0's name, compute capability and the CUDA driver version, for model.json (empty without a driver)."""
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


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP32 ONNX -> FP16 ONNX with FP32 I/O (Cast at both ends), for a strongly typed TensorRT network.

    The same job as onnxconverter-common's convert_float_to_float16(keep_io_types=True), with onnx alone and for
    the ops of this U-Net; anything else is refused (BuildError) rather than guessed at. A graph's THRESHOLD and
    MODEL_VERSION outputs are kept as they are (FP32 and INT32 constants).
    """
    identity = read_identity(model)
    model = strip_identity(model)
    graph = model.graph
    unsupported = sorted({n.op_type for n in graph.node} - FP16_OPS)
    if unsupported:
        raise BuildError(f"FP16 conversion does not handle ops {unsupported}")
    keep32 = {n.input[i] for n in graph.node for i in FP32_INPUTS.get(n.op_type, ()) if i < len(n.input)}

    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep32:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in keep32:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))

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
    return add_identity(model, *identity) if identity else model


def _identity_mismatch(results, reference: str, candidate: str) -> str | None:
    for ref, got in zip(results[reference], results[candidate]):
        for name in (c.THRESHOLD, c.MODEL_VERSION):
            if not np.array_equal(np.asarray(ref[name]), np.asarray(got[name])):
                return f"{name} {np.asarray(got[name]).ravel()[:1]} vs {np.asarray(ref[name]).ravel()[:1]}"
    return None


def build_tensorrt_plan(fp32_onnx: Path, plan_path: Path, working_size: int, max_batch_size: int, opt_batch: int,
                        feeds: list, strongly_typed: bool | None = None, workdir: Path | None = None) -> dict:
    """FP16 plan with an optimisation profile over batch 1..max_batch_size, checked against ONNX Runtime FP32 on
    the serving session through Polygraphy's Comparator (FP16_TOLERANCE). BuildError if the build or a check
    fails. TensorRT 10 uses the fp16 builder flag; TensorRT 11 (no such flag) or `strongly_typed` builds a strongly
    typed network from an FP16 ONNX (I/O kept FP32)."""
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, Profile, TrtRunner, engine_from_network,
                                        network_from_onnx_path, save_engine)
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    from .parity import difference_figures, serving_runner

    def shape(batch: int) -> tuple:
        return (batch, 3, working_size, working_size)

    opt = max(1, min(opt_batch, max_batch_size))
    profile = Profile().add(c.PIXELS, min=shape(1), opt=shape(opt), max=shape(max_batch_size))
    if strongly_typed is None:
        strongly_typed = not hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11: precision comes from the ONNX types
    if strongly_typed:
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

    results = Comparator.run([serving_runner(fp32_onnx), TrtRunner(engine, name="tensorrt-fp16")], data_loader=feeds)
    max_ok = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
        atol=FP16_TOLERANCE["max_atol"], rtol=0.0, check_error_stat="max"))
    mean_ok = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
        atol=FP16_TOLERANCE["mean_atol"], rtol=0.0, check_error_stat="mean"))
    figures = difference_figures(results, "onnxruntime-fp32", "tensorrt-fp16")
    identity = _identity_mismatch(results, "onnxruntime-fp32", "tensorrt-fp16")
    figures.update(reference="onnxruntime-fp32", candidate="tensorrt-fp16", tolerance=FP16_TOLERANCE,
                   identity_identical=identity is None, passed=bool(max_ok) and bool(mean_ok) and identity is None)
    if identity:
        raise BuildError(f"the TensorRT plan changes the version's identity ({identity}): try --strongly-typed")
    if not figures["passed"]:
        raise BuildError(f"TensorRT FP16 disagrees with ONNX Runtime FP32: max |diff| {figures['max_abs']:.3g} "
                         f"(limit {FP16_TOLERANCE['max_atol']}), mean {figures['mean_abs']:.3g} "
                         f"(limit {FP16_TOLERANCE['mean_atol']})")
    return {"mode": mode, "strongly_typed": bool(strongly_typed), "build_s": round(build_s, 1),
            "profile": {"min": shape(1), "opt": shape(opt), "max": shape(max_batch_size)}, "parity": figures}
