"""Evaluate a checkpoint or an ONNX model at full resolution, exactly along the serving path.

Each photo: bytes -> fundus_hemorrhage.pipeline's preprocess and model steps -> fundus_hemorrhage.postprocessing
(probability at the original size, threshold, speck removal) -> scored against the full-size mask inside the FOV.

    python -m fundus_hemorrhage_training.evaluate --checkpoint runs/supervised/best.pt [--split val] [--threshold 0.5]
    python -m fundus_hemorrhage_training.evaluate --onnx model_repository/unet/1/model.onnx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.onnx_session import SERVING_THREADS
from fundus_hemorrhage.pipeline import Model, Pipeline, onnx_model, with_identity
from fundus_hemorrhage.postprocessing import (PostprocessConfig, find_lesions, min_lesion_area, original_fov_mask,
                                              probability_to_original)
from fundus_hemorrhage.preprocessing import ImageError, PreprocessConfig

from .common import DEFAULT_DATA, UNTUNED_THRESHOLD, checkpoint_threshold, load_checkpoint
from .data import read_manifest
from .metrics import SegmentationScores
from .model import build_model


def torch_predictor(model: torch.nn.Module, device: torch.device | str = "cpu") -> Model:
    """A training model (logits) as a pipeline `Model` (sigmoid probabilities; version 0, threshold 0.5)."""
    model = model.eval().to(device)

    @torch.no_grad()
    def probability(pixels: np.ndarray) -> np.ndarray:
        return torch.sigmoid(model(torch.from_numpy(pixels).to(device))).float().cpu().numpy()

    return with_identity(probability, 0, UNTUNED_THRESHOLD)


def onnx_predictor(path: Path, threads: int = SERVING_THREADS) -> Model:
    """An ONNX graph on the serving session options."""
    return onnx_model(path, threads)


def evaluate(model: Model, manifest: Path, split: str = "val", threshold: float = UNTUNED_THRESHOLD,
             preprocess_config: PreprocessConfig = PreprocessConfig(), progress: bool = True) -> dict:
    """Scores at full resolution at `threshold` (not the graph's own); also the Dice-optimal threshold on this
    split (for threshold choice). Raises ImageError for a photo the service would refuse."""
    rows = [r for r in read_manifest(manifest) if r.split == split]
    post = PostprocessConfig()
    pipeline = Pipeline(model, preprocess_config, threads=1)
    scores = SegmentationScores()
    for row in tqdm(rows, desc=f"eval {split}", disable=not progress, leave=False):
        [pre] = pipeline.preprocess([row.image.read_bytes()])
        if isinstance(pre, str):
            raise ImageError(f"{row.image.name}: {pre}")
        prob = pipeline.predict([pre])[c.PROBABILITY][0]
        prob8 = probability_to_original(prob, pre.geometry)
        mask, _ = find_lesions(prob, pre.geometry, threshold, min_lesion_area(pre.geometry, post, prob.shape[-1]))
        truth = cv2.imread(str(row.mask), cv2.IMREAD_GRAYSCALE)
        scores.add(prob8, truth > 127, original_fov_mask(pre.geometry), mask)
    pipeline.close()
    best_threshold, best_dice = scores.best_threshold()
    return {**scores.summary(), "threshold": threshold, "split": split,
            "dice_optimal_threshold": round(best_threshold, 4), "dice_at_optimal_threshold": best_dice}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="training checkpoint (.pt)")
    source.add_argument("--onnx", type=Path, help="exported ONNX model")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_DATA / "idrid_he" / "manifest.csv")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threshold", type=float, default=None,
                        help="operating threshold (default: the checkpoint's chosen one, else 0.5)")
    parser.add_argument("--working-size", type=int, default=None,
                        help="preprocessing working size (default: the checkpoint's training one, else "
                             f"{PreprocessConfig().working_size})")
    parser.add_argument("--output", type=Path, help="also write the scores as JSON here")
    args = parser.parse_args(argv)

    threshold, working_size = args.threshold, args.working_size
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        model = build_model(ckpt["model_config"])
        model.load_state_dict(ckpt["state_dict"])
        predict = torch_predictor(model)
        threshold = threshold if threshold is not None else checkpoint_threshold(ckpt)
        working_size = working_size or ckpt.get("config", {}).get("working_size")
    else:
        predict = onnx_predictor(args.onnx)
    config = PreprocessConfig(working_size=working_size or PreprocessConfig().working_size)
    scores = evaluate(predict, args.manifest, args.split, UNTUNED_THRESHOLD if threshold is None else threshold,
                      config)
    print(json.dumps(scores, indent=2))
    if args.output:
        args.output.write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main()
