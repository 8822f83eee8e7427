"""Segmentation training: supervised, multi-task (with the reconstruction decoder), or fine-tuning.

    # supervised baseline from random init
    python -m training.train_segmentation --output runs/supervised
    # multi-task: labelled patches train segmentation + reconstruction, unlabeled ones reconstruction only
    python -m training.train_segmentation --unlabeled ../shared/data/fundus_unlabeled --output runs/mtl
    # fine-tuning from a MoCo encoder or any earlier checkpoint
    python -m training.train_segmentation --init runs/moco/last.pt --output runs/finetune
    # the same under DDP
    torchrun --nproc_per_node=2 -m training.train_segmentation ...

Losses: segmentation = BCE + soft Dice on the soft working-grid target, inside the FOV, weighted per photo by
label quality (lossy 512 px labels count half). Reconstruction = L1 between the decoder's output and the
(augmented) input patch inside the FOV, weighted by --reconstruction-weight (default 0.5) for every patch.
The final checkpoint carries the Dice-optimal threshold on `val`, which serving uses as its operating point.
What is evaluated and saved is the weights' moving average (--ema), with BatchNorm statistics recomputed for it.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from fundus_hemorrhage.preprocessing import PreprocessConfig

from .common import (DEFAULT_DATA, REPO_ROOT, Distributed, json_safe, load_checkpoint, log_json, save_checkpoint,
                     set_cpu_threads)
from .data import PatchDataset, load_labelled, load_unlabeled, split_ids
from .evaluate import evaluate, torch_predictor
from .model import DEFAULT_CHANNELS, build_model


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice inside the FOV; each patch's pixels weighted by its photo's label weight.

    The Dice is pooled over the batch rather than per patch: a per-patch Dice rewards predicting
    nothing on the many patches with tiny or no lesions, and stalls learning.
    """
    pixel_weight = fov * weight.view(-1, 1, 1, 1)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    bce = (bce * pixel_weight).sum() / pixel_weight.sum().clamp_min(1.0)
    prob = torch.sigmoid(logits.float()) * pixel_weight
    dice = 1.0 - (2.0 * (prob * target).sum() + 1.0) / (prob.sum() + (target * pixel_weight).sum() + 1.0)
    return bce + dice


@torch.no_grad()
def recompute_batch_norm(model: torch.nn.Module, loader, device: torch.device, batches: int, bf16: bool) -> None:
    """Re-estimate every BatchNorm's statistics of `model` on `batches` training batches (cumulative average).

    The averaged (EMA) weights need statistics of their own: the average of the raw model's running statistics
    is not what the averaged weights produce (torch.optim.swa_utils.update_bn does this for SWA). Without it,
    one EMA model here scored 0.03 val pixel AUPR, and 0.51 after this step.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    for _, batch in zip(range(batches), loader):
        pixels = batch["pixels"].to(device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(pixels)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def reconstruction_loss(reconstruction: torch.Tensor, pixels: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
    return ((reconstruction - pixels).abs() * fov).sum() / (fov.sum() * pixels.shape[1]).clamp_min(1.0)


def load_init(model: torch.nn.Module, path: Path) -> str:
    """Initialise from a MoCo checkpoint (encoder only) or a segmentation checkpoint (all that matches)."""
    ckpt = load_checkpoint(path)
    state = ckpt["state_dict"]
    if ckpt.get("stage") == "moco":
        missing = model.encoder.load_state_dict(state, strict=True)
        return f"encoder from MoCo checkpoint {path} ({missing})"
    model.load_state_dict(state, strict=False)
    return f"all weights from {ckpt.get('stage', '?')} checkpoint {path}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=DEFAULT_DATA / "idrid_he" / "manifest.csv")
    p.add_argument("--unlabeled", type=Path, default=None,
                   help="folder of unlabeled photos: turns on multi-task training (reconstruction on them)")
    p.add_argument("--init", type=Path, default=None, help="checkpoint to start from (MoCo or segmentation)")
    p.add_argument("--output", type=Path, required=True, help="run folder: checkpoints and log.jsonl")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps-per-epoch", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--patch", type=int, default=256, help="patch side on the working grid")
    p.add_argument("--working-size", type=int, default=PreprocessConfig().working_size)
    p.add_argument("--channels", type=int, nargs="+", default=list(DEFAULT_CHANNELS))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--reconstruction-weight", type=float, default=0.5)
    p.add_argument("--unlabeled-fraction", type=float, default=0.5, help="share of patches from unlabeled photos")
    p.add_argument("--lesion-focus", type=float, default=0.5, help="share of labelled patches centred on a lesion")
    p.add_argument("--eval-every", type=int, default=5, help="epochs between val evaluations (0: only at the end)")
    p.add_argument("--include-val", action="store_true",
                   help="refit: train on train + val with a recipe already chosen on val; nothing is evaluated, "
                        "and --threshold (chosen on val by the held-out runs of the recipe) is the operating point")
    p.add_argument("--threshold", type=float, default=None, help="operating threshold for --include-val")
    p.add_argument("--ema", type=float, default=0.998,
                   help="decay of the exponential moving average of the weights that is evaluated and saved "
                        "(0: the raw weights; version 1 was trained with 0)")
    p.add_argument("--bn-batches", type=int, default=50,
                   help="training batches over which the averaged model's BatchNorm statistics are recomputed "
                        "before each evaluation and save")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train in float32 (default: bfloat16 autocast, ~3x faster on AVX-512-BF16 CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "preprocessed")
    p.add_argument("--no-progress", action="store_true")
    # Test hook: every rank saves its model state_dict as DIR/rank{R}.pt at the end, so that a test can check
    # that DDP kept the ranks identical. Not for normal use.
    p.add_argument("--save-rank-states", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.include_val and args.threshold is None:
        p.error("--include-val needs --threshold (val cannot choose it when val is trained on)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    world = Distributed(args.device)
    set_cpu_threads(world.world_size)
    torch.manual_seed(args.seed)
    multitask = args.unlabeled is not None
    stage = "multitask" if multitask else ("finetune" if args.init else "supervised")
    pre_config = PreprocessConfig(working_size=args.working_size)

    labelled = load_labelled(args.manifest, "train", pre_config, args.cache)
    if args.include_val:
        labelled += load_labelled(args.manifest, "val", pre_config, args.cache)
    unlabeled = (load_unlabeled(args.unlabeled, pre_config, args.cache, split_ids(args.manifest, "val"))
                 if multitask else [])
    dataset = PatchDataset(labelled, args.patch, args.steps_per_epoch * args.batch_size * world.world_size,
                           args.lesion_focus, args.seed, unlabeled, args.unlabeled_fraction)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed) if world.enabled else None
    loader = DataLoader(dataset, args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        num_workers=args.workers, prefetch_factor=4 if args.workers else None,
                        persistent_workers=args.workers > 0, pin_memory=world.device.type == "cuda")

    model = build_model({"channels": args.channels}).to(world.device, memory_format=torch.channels_last)
    init_note = load_init(model, args.init) if args.init else "random init"
    if world.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if world.device.type == "cuda" else model
        ddp = DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                                      find_unused_parameters=not multitask)  # the unused reconstruction decoder
    else:
        ddp = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Averaged weights: with 43 photos the raw weights' val scores swing by +-0.08 AUPR between epochs.
    # Only the parameters are averaged: the BatchNorm statistics of the averaged weights are recomputed
    # (recompute_batch_norm) before every evaluation and save, which replaces whatever the buffers held.
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=False)
                if args.ema > 0 else None)
    served = averaged.module if averaged is not None else model  # what is evaluated and saved
    total_steps = args.epochs * args.steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total_steps))))
    log = args.output / "log.jsonl" if world.is_main else None
    if world.is_main:
        print(f"[{stage}] {len(labelled)} labelled, {len(unlabeled)} unlabeled photos; {init_note}; "
              f"world size {world.world_size} on {world.device}", flush=True)

    started, metrics, best_aupr = time.time(), {}, -1.0
    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        ddp.train()
        running = {"seg": 0.0, "rec": 0.0}
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or not world.is_main, leave=False)
        for batch in bar:
            pixels = batch["pixels"].to(world.device, non_blocking=True, memory_format=torch.channels_last)
            target, fov = batch["target"].to(world.device), batch["fov"].to(world.device)
            weight = batch["label_weight"].to(world.device)
            with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=args.bf16):
                if multitask:
                    logits, reconstruction = ddp(pixels, reconstruct=True)
                    rec = reconstruction_loss(reconstruction.float(), pixels, fov)
                else:
                    logits, rec = ddp(pixels), torch.zeros((), device=world.device)
            # Batches without a labelled patch still need the segmentation graph in the loss (DDP).
            seg = segmentation_loss(logits, target, fov, weight) if weight.sum() > 0 else logits.sum() * 0.0
            loss = seg + args.reconstruction_weight * rec
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if averaged is not None:
                averaged.update_parameters(model)
            running["seg"] += seg.item()
            running["rec"] += rec.item()
            bar.set_postfix(seg=f"{seg.item():.3f}", rec=f"{rec.item():.3f}")
        record = {"epoch": epoch + 1, "step": (epoch + 1) * args.steps_per_epoch, "lr": schedule.get_last_lr()[0],
                  "elapsed_s": round(time.time() - started, 1),
                  **{f"loss_{k}": world.mean(v / len(loader)) for k, v in running.items()}}
        last = epoch + 1 == args.epochs
        evaluate_now = last or (args.eval_every and (epoch + 1) % args.eval_every == 0)
        if world.is_main and averaged is not None and evaluate_now:
            recompute_batch_norm(served, loader, world.device, args.bn_batches, args.bf16)
        if world.is_main and evaluate_now and not args.include_val:
            metrics = evaluate(torch_predictor(served, world.device), args.manifest, "val",
                               preprocess_config=pre_config, progress=False)
            model.train()
            record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            save_checkpoint(args.output / "latest.pt", served, stage=stage, config=json_safe(vars(args)),
                            metrics=metrics, manifest=args.manifest, extra={"epoch": epoch + 1})
            if metrics["pixel_aupr"] > best_aupr:  # early-stopping candidate (selected on val: biased upwards)
                best_aupr = metrics["pixel_aupr"]
                save_checkpoint(args.output / "best.pt", served, stage=stage,
                                config=json_safe(vars(args)) | {"init_note": init_note}, metrics=metrics,
                                manifest=args.manifest,
                                extra={"epoch": epoch + 1, "threshold": metrics["dice_optimal_threshold"]})
        if world.is_main:
            log_json(log, record)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
    if world.is_main:
        if args.include_val:
            threshold, metrics = args.threshold, {"note": "refit on train + val: no held-out score"}
        else:
            # Operating point: the Dice-optimal threshold on val, then the scores at it.
            threshold = metrics["dice_optimal_threshold"]
            metrics = evaluate(torch_predictor(served, world.device), args.manifest, "val", threshold, pre_config,
                               progress=False)
        metrics["train_wall_time_s"] = round(time.time() - started, 1)
        save_checkpoint(args.output / "last.pt", served, stage=stage,
                        config=json_safe(vars(args)) | {"init_note": init_note}, metrics=metrics,
                        manifest=args.manifest, extra={"threshold": threshold})
        print(f"[{stage}] done: {metrics}", flush=True)
    if args.save_rank_states is not None:
        args.save_rank_states.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   args.save_rank_states / f"rank{world.rank}.pt")
    world.barrier()
    world.close()
    return metrics


if __name__ == "__main__":
    main()
