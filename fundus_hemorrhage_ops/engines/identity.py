"""A unet version's identity inside its graph: THRESHOLD and MODEL_VERSION outputs, constant per version.

They travel with the probabilities through the ensemble, so postprocess thresholds with the threshold of the
version that produced the probabilities and the report names it, with no look-up on disk, whichever version
(or versions, side by side) Triton serves. Baked into the ONNX graph, they survive the TensorRT build too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fundus_hemorrhage import contract as c

_PREFIX = "version_identity/"


def add_identity(model: onnx.ModelProto, version: int, threshold: float) -> onnx.ModelProto:
    """Copy of `model` with outputs THRESHOLD float32 [N, 1] = threshold and MODEL_VERSION int32 [N, 1] = version
    (N = the batch of PIXELS); an identity already there is replaced. Probabilities are untouched."""
    model = strip_identity(model)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), _PREFIX + "zero"),
                              numpy_helper.from_array(np.array([1], np.int64), _PREFIX + "one")])
    graph.node.extend([
        helper.make_node("Shape", [c.PIXELS], [_PREFIX + "shape"], name=_PREFIX + "shape"),
        helper.make_node("Slice", [_PREFIX + "shape", _PREFIX + "zero", _PREFIX + "one"], [_PREFIX + "batch"],
                         name=_PREFIX + "batch"),
        helper.make_node("Concat", [_PREFIX + "batch", _PREFIX + "one"], [_PREFIX + "dims"], axis=0,
                         name=_PREFIX + "dims"),
        helper.make_node("ConstantOfShape", [_PREFIX + "dims"], [c.THRESHOLD], name=_PREFIX + "threshold",
                         value=numpy_helper.from_array(np.array([threshold], np.float32))),
        helper.make_node("ConstantOfShape", [_PREFIX + "dims"], [c.MODEL_VERSION], name=_PREFIX + "model_version",
                         value=numpy_helper.from_array(np.array([version], np.int32))),
    ])
    graph.output.extend([helper.make_tensor_value_info(c.THRESHOLD, TensorProto.FLOAT, ["batch", 1]),
                         helper.make_tensor_value_info(c.MODEL_VERSION, TensorProto.INT32, ["batch", 1])])
    onnx.checker.check_model(model)
    return model


def strip_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of `model` without the identity nodes and outputs (the graph as exported from PyTorch)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    keep_nodes = [n for n in graph.node if not n.name.startswith(_PREFIX)]
    keep_init = [i for i in graph.initializer if not i.name.startswith(_PREFIX)]
    keep_out = [o for o in graph.output if o.name not in (c.THRESHOLD, c.MODEL_VERSION)]
    for field, keep in ((graph.node, keep_nodes), (graph.initializer, keep_init), (graph.output, keep_out)):
        del field[:]
        field.extend(keep)
    return model


def read_identity(model: onnx.ModelProto | str | Path) -> tuple[int, float] | None:
    """(version, threshold) baked into a graph, or None for a graph without them."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    values = {}
    for node in model.graph.node:
        if node.name in (_PREFIX + "threshold", _PREFIX + "model_version"):
            values[node.name] = numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0].item()
    if len(values) != 2:
        return None
    return int(values[_PREFIX + "model_version"]), float(values[_PREFIX + "threshold"])


def write_with_identity(source: Path, target: Path, version: int, threshold: float) -> None:
    """`source` ONNX file -> `target` with the identity of `version` (target may be source)."""
    onnx.save(add_identity(onnx.load(str(source)), version, threshold), str(target))
