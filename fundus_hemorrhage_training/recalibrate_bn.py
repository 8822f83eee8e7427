"""Recompute the BatchNorm statistics of a segmentation checkpoint, score it on val and save it.

For checkpoints written before train_segmentation recomputed them itself: their averaged (EMA) weights carry
the average of the raw model's running statistics, which is not what the averaged weights produce.

    python -m fundus_hemorrhage_training.recalibrate_bn --checkpoint runs/sweep/moco_mtl_s1/best.pt --output checkpoints/unet_v2.pt

The batches are training patches drawn as in training (the checkpoint's patch size, batch size and lesion
focus; unlabeled photos mixed in as in multi-task training when --unlabeled is given). The saved checkpoint
carries the new val metrics and the Dice-optimal threshold on val.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fundus_hemorrhage.preprocessing import PreprocessConfig

from .common import DEFAULT_DATA, REPO_ROOT, load_checkpoint, save_checkpoint
from .data import PatchDataset, load_labelled, load_unlabeled, split_ids
from .evaluate import evaluate, torch_predictor
from .model import build_model
from .train_segmentation import recompute_batch_norm


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--manifest", type=Path, default=DEFAULT_DATA / "idrid_he" / "manifest.csv")
    p.add_argument("--unlabeled", type=Path, default=None, help="folder of unlabeled photos (multi-task runs)")
    p.add_argument("--batches", type=int, default=50, help="(default: 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "preprocessed")
    args = p.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt["config"]
    pre_config = PreprocessConfig(working_size=config.get("working_size", PreprocessConfig().working_size))
    labelled = load_labelled(args.manifest, "train", pre_config, args.cache)
    unlabeled = (load_unlabeled(args.unlabeled, pre_config, args.cache, split_ids(args.manifest, "val"))
                 if args.unlabeled else [])
    dataset = PatchDataset(labelled, config["patch"], args.batches * config["batch_size"], config["lesion_focus"],
                           args.seed, unlabeled, config.get("unlabeled_fraction", 0.0))
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    before = ckpt["metrics"].get("pixel_aupr", float("nan"))  # nan: a refit on train + val has no val score
    recompute_batch_norm(model, DataLoader(dataset, config["batch_size"], num_workers=1), torch.device("cpu"),
                         args.batches, args.bf16)
    metrics = evaluate(torch_predictor(model), args.manifest, "val", preprocess_config=pre_config, progress=False)
    threshold = metrics["dice_optimal_threshold"]
    metrics = evaluate(torch_predictor(model), args.manifest, "val", threshold, pre_config, progress=False)
    note = {"from": str(args.checkpoint), "batches": args.batches, "unlabeled": str(args.unlabeled),
            "val_pixel_aupr_before": before}
    save_checkpoint(args.output, model, stage=ckpt["stage"], config=config | {"bn_recomputed": note},
                    metrics=metrics, manifest=args.manifest,
                    extra={k: ckpt[k] for k in ("epoch",) if k in ckpt} | {"threshold": threshold})
    print(f"{args.checkpoint}: val pixel AUPR {before:.4f} -> {metrics['pixel_aupr']:.4f} after recomputing "
          f"BatchNorm statistics on {args.batches} batches; threshold {threshold:.4f}", flush=True)
    return metrics


if __name__ == "__main__":
    main()
