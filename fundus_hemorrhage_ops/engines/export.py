"""Training checkpoint -> FP32 ONNX for serving, and the metadata a version folder records (model.json).

The exported graph maps PIXELS float32 [N, 3, S, S] (values in [0, 1], S = the working size in pixels) to
PROBABILITY float32 [N, 1, S, S] (sigmoid of the U-Net's logits), N dynamic. build_engines adds the version's
THRESHOLD and MODEL_VERSION outputs (identity.add_identity) before anything is written into a version folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch

from fundus_hemorrhage_training.common import checkpoint_threshold, load_checkpoint
from fundus_hemorrhage_training.model import SegmentationExport, build_model

from fundus_hemorrhage import contract as c
from . import BuildError

OPSET = 17


def load_model(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """(U-Net in eval mode, the checkpoint dict). Raises BuildError (one line) for a damaged or foreign file."""
    try:
        ckpt = load_checkpoint(checkpoint)
        model = build_model(ckpt["model_config"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # say which file and why, not a traceback
        raise BuildError(f"cannot load checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from None
    return model.eval(), ckpt


def export_onnx(model: torch.nn.Module, path: Path, working_size: int) -> Path:
    """`model` (logits) wrapped in SegmentationExport -> ONNX at `path`, dynamic batch axis, contract I/O names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, working_size, working_size)
    torch.onnx.export(SegmentationExport(model.eval()), example, str(path), input_names=[c.PIXELS],
                      output_names=[c.PROBABILITY], dynamic_axes={c.PIXELS: {0: "batch"}, c.PROBABILITY: {0: "batch"}},
                      opset_version=OPSET, dynamo=False)
    return path


def export_checkpoint(checkpoint: Path, onnx_path: Path, working_size: int | None = None):
    """(SegmentationExport module, checkpoint dict, working size in px): the checkpoint exported as FP32 ONNX
    and checked. The working size defaults to the one the checkpoint was trained at, else the contract's."""
    model, ckpt = load_model(checkpoint)
    size = int(working_size or (ckpt.get("config") or {}).get("working_size") or c.WORKING_SIZE)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    export_onnx(model, onnx_path, size)
    check_onnx(onnx_path)
    return SegmentationExport(model).eval(), ckpt, size


def model_metadata(ckpt: dict, checkpoint_name: str, precision: str) -> dict:
    """What serving and people need to know about a version: operating threshold (chosen on val at training,
    stored in the checkpoint), precision, provenance, val scores. `checkpoint_name` is the path inside checkpoints/."""
    return {
        "threshold": checkpoint_threshold(ckpt),
        "precision": precision,
        "stage": ckpt.get("stage"),
        "checkpoint": checkpoint_name,
        "model_config": ckpt.get("model_config"),
        "git_commit": ckpt.get("git_commit"),
        "manifest_sha256": ckpt.get("manifest_sha256"),
        "trained": ckpt.get("created"),
        "val_metrics": ckpt.get("metrics"),
    }


def check_onnx(path: Path, outputs: tuple[str, ...] = (c.PROBABILITY,)) -> None:
    """onnx.checker (full), I/O names [PIXELS] -> `outputs`, dynamic batch axis; BuildError otherwise."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BuildError(f"onnx.checker rejects {path.name}: {str(exc).splitlines()[0]}") from None
    model = onnx.load(str(path), load_external_data=False)
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != ([c.PIXELS], list(outputs)):
        raise BuildError(f"{path.name} has I/O {names}, config.pbtxt needs [{c.PIXELS}] -> {list(outputs)}")
    if not model.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        raise BuildError(f"{path.name}: the batch axis of {c.PIXELS} is not dynamic")


def onnx_working_size(path: Path) -> int:
    """Side S in pixels of the PIXELS input [N, 3, S, S]."""
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def onnx_opset(path: Path) -> int | None:
    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next((o.version for o in imports if o.domain in ("", "ai.onnx")), None)
