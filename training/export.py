"""Checkpoint -> ONNX for serving, and the version folder's metadata (model.json)."""

from __future__ import annotations

from pathlib import Path

import torch

from .common import load_checkpoint
from .model import SegmentationExport, build_model

INPUT_NAME, OUTPUT_NAME = "PIXELS", "PROBABILITY"
OPSET = 17


def load_model(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def export_onnx(model: torch.nn.Module, path: Path, working_size: int) -> Path:
    """ONNX with a dynamic batch axis; names match model_repository/unet/config.pbtxt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, working_size, working_size)
    torch.onnx.export(SegmentationExport(model.eval()), example, str(path), input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                      opset_version=OPSET, dynamo=False)
    return path


def model_metadata(ckpt: dict, checkpoint: Path, precision: str) -> dict:
    """What serving and people need to know about a version: operating threshold, provenance, scores."""
    return {
        "threshold": float(ckpt.get("threshold", 0.5)),
        "precision": precision,
        "stage": ckpt.get("stage"),
        "checkpoint": checkpoint.name,
        "model_config": ckpt.get("model_config"),
        "git_commit": ckpt.get("git_commit"),
        "manifest_sha256": ckpt.get("manifest_sha256"),
        "trained": ckpt.get("created"),
        "val_metrics": ckpt.get("metrics"),
    }
