"""Self-supervised MoCo v2 pretraining of the U-Net encoder on unlabeled fundus photos.

    python -m fundus_hemorrhage_training.pretrain_moco --output runs/moco
    python -m fundus_hemorrhage_training.pretrain_moco --unlabeled DIR --unlabeled DIR2 --manifest M.csv --output runs/moco
    torchrun --nproc_per_node=2 -m fundus_hemorrhage_training.pretrain_moco --output runs/moco
    # then fine-tune:  python -m fundus_hemorrhage_training.train_segmentation --init runs/moco/last.pt --output runs/finetune

Every photo goes through preprocess_backend exactly as in serving (fundus_hemorrhage_training.data.load_unlabeled). A training
pair is two views of one photo: both crops are centred within +-patch/3 of a common anchor inside the FOV (so
they overlap: ~60% of one view's pixels are in the other, tests/test_moco.py), then each gets
fundus_hemorrhage_training.data.augment with its own random stream (scale, rotation, flips, gamma/gain jitter, blur)
plus strong_photometric (`--colour-jitter`); pixels outside the FOV are zeroed as in serving.

Optimiser: SGD (momentum 0.9, weight decay 1e-4) with a linear warm-up and a cosine schedule. The peak learning
rate follows the linear scaling rule, LR_PER_256 x global batch / 256 (`--lr` overrides). `--batch-size` is per
process; under torchrun the queue is filled with every process's keys and BN is shuffled across processes (on
one process `--bn-groups` simulates it).

The log has, per epoch, the loss, `top1` (the positive first among 1 + K, against the queue), `top1_batch` (first
among this batch's N keys, chance 1/N) and `queue_age_gap` (moco.MoCo). Read `top1` with the gap: while the gap is
large, old queue keys are easy negatives because the key encoder has moved since, and `top1` measures that drift
as much as the representation.

Rank 0 writes a resumable state.pt every --checkpoint-every steps (fundus_hemorrhage_training.resumable: the same command continues
an interrupted run) and `last.pt` (stage "moco") at the end: its `state_dict` is the query encoder's, which
train_segmentation --init loads into `model.encoder`; the architecture and `--working-size` must match there.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fundus_hemorrhage.preprocessing import PreprocessConfig

from .common import DEFAULT_DATA, REPO_ROOT, format_record, json_safe, log_json, save_checkpoint, start_world
from .data import Example, augment, list_images, load_manifest_images, load_unlabeled, split_ids
from .model import ARCHITECTURES, DEFAULT_CHANNELS
from .moco import MoCo
from .resumable import FINAL, StepSampler, finished_metrics, load_state, save_state, truncate_log


# Logged per epoch: the InfoNCE loss, top-1 against the queue, and moco.MoCo.stats (top-1 among this batch's own
# keys, which stale queue entries cannot flatter, and the queue's age gap, which says whether they do).
LOGGED = ("loss", "top1", "top1_batch", "queue_age_gap")
BN_GROUPS = 1
COLOUR_JITTER = 1.0
# Peak learning rate per 256 pairs. The 2026-12 GPU run used 0.03 at batch 64 (MoCo's 0.03 is for batch 256: four
# times its rate per pair) and from random init its top-1 followed the learning rate (the queue's stale keys were
# easy negatives) while the representation barely moved. Measured on CPU (random-init Lite0, batch 32, 64-px crops
# on the 320 grid, K = 1024, 500 steps, no stochastic depth, --colour-jitter 0): 0.0075 at batch 32 (this rule)
# against 0.03 gave top1_batch 0.28 against 0.19 at the end; at step 400 queue_age_gap 0.05 against 0.12 and
# retrieval of held-out pairs 0.05 against 0.02 (top-1 of 256).
LR_PER_256 = 0.06


def strong_photometric(rng: np.random.Generator, img: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Photometric augmentation of one view, float32 RGB [P, P, 3] in [0, 1], on top of data.augment's own jitter.

    At strength 1: brightness/contrast/saturation x[0.8, 1.2] and hue +-0.02 turns (p=0.8, random order), blur
    p=0.3 (milder than MoCo v2's ColorJitter(0.4, 0.4, 0.4, 0.1) + RandomGrayscale: colour is what tells a
    haemorrhage from a vessel or the optic disc). The ranges scale with `strength`; 0 returns `img` unchanged
    and draws nothing from `rng`.
    """
    if strength <= 0:
        return img
    if rng.random() < 0.8:
        for op in rng.permutation(4):
            if op == 0:  # brightness
                img = img * np.float32(rng.uniform(1 - 0.2 * strength, 1 + 0.2 * strength))
            elif op == 1:  # contrast, around the mean grey level
                mean = np.float32(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean())
                img = (img - mean) * np.float32(rng.uniform(1 - 0.2 * strength, 1 + 0.2 * strength)) + mean
            elif op == 2:  # saturation
                grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None]
                img = (img - grey) * np.float32(rng.uniform(1 - 0.2 * strength, 1 + 0.2 * strength)) + grey
            else:  # hue
                hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # H in degrees
                hsv[..., 0] = (hsv[..., 0] + np.float32(rng.uniform(-0.02, 0.02) * strength * 360.0)) % 360.0
                img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
            img = np.clip(img, 0.0, 1.0)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.1, 1.0)))
    return np.ascontiguousarray(np.clip(img, 0.0, 1.0), dtype=np.float32)


class TwoViewDataset(Dataset):
    """`length` pairs; the photo, anchor and both views' augmentation are random per (seed, epoch, index).
    `colour_jitter`: strong_photometric's strength on top of data.augment's jitter (0: augment's alone)."""

    def __init__(self, examples: list[Example], patch: int, length: int, seed: int = 0, colour_jitter: float = 1.0):
        if not examples:
            raise ValueError("no photos to pretrain on")
        self.examples, self.patch, self.length, self.seed, self.epoch = examples, patch, length, seed, 0
        self.colour_jitter = colour_jitter

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def view(self, rng: np.random.Generator, ex: Example, centre: tuple[float, float],
             *maps: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
        """One view [3, P, P] (zero outside the FOV), and `maps` warped with the same geometry."""
        img, fov, *warped = augment(rng, ex.pixels, ex.fov, *maps, patch=self.patch, centre=centre)
        img = strong_photometric(rng, img, self.colour_jitter) * fov[..., None].astype(np.float32)
        return torch.from_numpy(img.transpose(2, 0, 1).copy()), [fov, *warped]

    def pair(self, index: int, *maps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """(view_q, view_k, [fov_q, *maps_q], [fov_k, *maps_k]): both views of item `index`, each with its warped FOV
        and `maps` (arrays on the working grid, e.g. pixel coordinates) warped as that view was."""
        rng = np.random.default_rng((self.seed, self.epoch, index))
        ex = self.examples[rng.integers(len(self.examples))]
        s = ex.pixels.shape[0]
        # Common anchor, uniform over a disc well inside the FOV (as augment picks its centres).
        r = (rng.uniform(0.0, 1.0) ** 0.5) * 0.42 * s
        t = rng.uniform(0.0, 2.0 * np.pi)
        centre = (s / 2 + r * np.sin(t), s / 2 + r * np.cos(t))
        # Independent streams for the two views.
        rng_q, rng_k = (np.random.default_rng((self.seed, self.epoch, index, v)) for v in (1, 2))
        (view_q, maps_q), (view_k, maps_k) = (self.view(g, ex, centre, *maps) for g in (rng_q, rng_k))
        return view_q, view_k, maps_q, maps_k

    def __getitem__(self, index: int) -> dict:
        view_q, view_k, _, _ = self.pair(index)
        return {"view_q": view_q, "view_k": view_k}


def data_fingerprint(folders: list[Path]) -> str:
    """Hash of the unlabeled photos' paths and sizes: which data a pretrained encoder saw."""
    h = hashlib.sha256()
    for folder in folders:
        for p in list_images(folder):
            h.update(f"{p.relative_to(folder)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unlabeled", type=Path, action="append", default=None, metavar="DIR",
                   help=f"folder of photos (searched recursively); repeat for several (default: "
                        f"{DEFAULT_DATA / 'fundus_unlabeled'})")
    p.add_argument("--manifest", type=Path, default=None,
                   help="also pretrain on the images (not the labels) of this manifest's photos outside its val "
                        "split: train and the never-annotated ones (default: no)")
    p.add_argument("--holdout-manifest", type=Path, default=DEFAULT_DATA / "idrid_he" / "manifest.csv",
                   help="photos of this manifest's val split are left out of pretraining (default: %(default)s)")
    p.add_argument("--output", type=Path, required=True, help="run folder: last.pt and log.jsonl")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train in float32 (default: bfloat16 autocast, ~3x faster on AVX-512-BF16 CPUs)")
    p.add_argument("--epochs", type=int, default=100, help="(default: 100)")
    p.add_argument("--steps-per-epoch", type=int, default=50, help="(default: 50)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per process (default: 32)")
    p.add_argument("--patch", type=int, default=128, help="crop side on the working grid, a multiple of 16 "
                                                           "(default: 128)")
    p.add_argument("--working-size", type=int, default=PreprocessConfig().working_size,
                   help="preprocessing working size; use the fine-tuning one (default: %(default)s, serving's)")
    p.add_argument("--channels", type=int, nargs="+", default=list(DEFAULT_CHANNELS),
                   help="lean encoder widths; must match fine-tuning (default: %(default)s)")
    p.add_argument("--architecture", default=ARCHITECTURES[0], choices=ARCHITECTURES,
                   help="encoder to pretrain; must match fine-tuning (default: %(default)s)")
    p.add_argument("--width", type=float, default=1.0, help="efficientnet-lite0 width multiplier")
    p.add_argument("--imagenet", action="store_true", help="start the efficientnet-lite0 encoder from ImageNet")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: cores / processes)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable states")
    p.add_argument("--restart", action="store_true", help="ignore an existing state.pt / last.pt")
    p.add_argument("--lr", type=float, default=None,
                   help=f"SGD peak learning rate (default: {LR_PER_256} x global batch / 256, the linear scaling "
                        f"rule: 0.0075 at batch 32, 0.015 at batch 64)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=100, help="(default: 100)")
    p.add_argument("--queue-size", type=int, default=1024,
                   help="K, negatives in the queue (default: 1024; with ~70 photos a larger queue is mostly "
                        "crops of the positive's own photo)")
    p.add_argument("--momentum", type=float, default=0.99, help="key encoder momentum m (default: 0.99)")
    p.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature T (default: 0.2)")
    p.add_argument("--dim", type=int, default=128, help="projection dimension (default: 128)")
    p.add_argument("--bn-groups", type=int, default=BN_GROUPS,
                   help="single process: shuffled BN simulated with this many groups of the batch (moco.MoCo; "
                        "ignored under torchrun, which shuffles across processes; default: %(default)s)")
    p.add_argument("--colour-jitter", type=float, default=COLOUR_JITTER,
                   help="strength of strong_photometric on top of data.augment's jitter (0: augment's alone; "
                        "default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    p.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "preprocessed",
                   help="preprocessed-photo cache (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Test hooks: every rank saves its full MoCo state_dict as DIR/rank{R}.pt at the end, so that a test can
    # check that DDP kept the ranks identical; the run stops (as if killed) after saving the state of step K.
    p.add_argument("--save-rank-states", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.unlabeled is None:
        args.unlabeled = [DEFAULT_DATA / "fundus_unlabeled"]
    if args.patch % 32:
        p.error("--patch must be a multiple of 32 (the encoders downsample up to 5 times)")
    if args.imagenet and args.architecture == ARCHITECTURES[0]:
        p.error("--imagenet needs --architecture efficientnet-lite0")
    return args


def encoder_config(args: argparse.Namespace) -> dict:
    """The encoder's part of the segmentation model config (what train_segmentation --init must match)."""
    if args.architecture == ARCHITECTURES[0]:
        return {"channels": list(args.channels), "in_channels": 3}
    return {"architecture": args.architecture, "width": args.width}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.restart and (metrics := finished_metrics(args.output)) is not None:
        return metrics
    world = start_world(args.device, args.threads, args.seed)
    pre_config = PreprocessConfig(working_size=args.working_size)

    holdout = split_ids(args.holdout_manifest, "val")
    photos = [ex for folder in args.unlabeled for ex in load_unlabeled(folder, pre_config, args.cache, holdout)]
    n_unlabeled = len(photos)
    if args.manifest is not None:
        photos += load_manifest_images(args.manifest, pre_config, args.cache)
    total_steps = args.epochs * args.steps_per_epoch
    dataset = TwoViewDataset(photos, args.patch, total_steps * args.batch_size * world.world_size, args.seed,
                             args.colour_jitter)

    moco = MoCo(encoder_config(args) | {"imagenet": args.imagenet}, dim=args.dim, queue_size=args.queue_size,
                momentum=args.momentum, temperature=args.temperature, bn_groups=args.bn_groups).to(world.device)
    model = (DistributedDataParallel(moco, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
             if world.enabled else moco)
    if args.lr is None:  # resolved here (it needs the world size), recorded in the checkpoint's config
        args.lr = LR_PER_256 * args.batch_size * world.world_size / 256
    optimizer = torch.optim.SGD(list(moco.query_parameters()), lr=args.lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps))
                                                 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))))
    resumables = {"moco": moco, "optimizer": optimizer, "schedule": schedule}
    step, running, elapsed_before = 0, dict.fromkeys(LOGGED, 0.0), 0.0
    resumed = None if args.restart else load_state(args.output, resumables)
    if resumed is not None:
        step, extra = resumed
        running, elapsed_before = dict.fromkeys(LOGGED, 0.0) | extra["running"], extra["elapsed_s"]
    if world.is_main:
        if resumed is None and args.output.exists():
            for name in ("log.jsonl", FINAL):
                (args.output / name).unlink(missing_ok=True)
        truncate_log(args.output, step)
    rng_state = torch.get_rng_state()
    loader = DataLoader(dataset, args.batch_size, shuffle=False, drop_last=True,
                        sampler=StepSampler(total_steps, args.batch_size, step, world.world_size, world.rank),
                        num_workers=args.workers, prefetch_factor=4 if args.workers else None,
                        pin_memory=world.device.type == "cuda", generator=torch.Generator())
    log = args.output / "log.jsonl" if world.is_main else None
    config = encoder_config(args)
    data_note = {"unlabeled_images": n_unlabeled, "manifest_images": len(photos) - n_unlabeled,
                 "unlabeled_sha256": data_fingerprint(args.unlabeled)}
    if world.is_main:
        print(f"[moco] {n_unlabeled} unlabeled + {len(photos) - n_unlabeled} manifest photos; "
              f"K={args.queue_size} m={args.momentum} T={args.temperature} lr={args.lr:.4g}; "
              f"{'resumed at step %d' % step if resumed else 'from step 0'} of {total_steps}; "
              f"world size {world.world_size} on {world.device}", flush=True)

    def checkpoint_state(at_step: int) -> None:
        if world.is_main:
            save_state(args.output, at_step, resumables,
                       {"running": running, "elapsed_s": elapsed_before + time.time() - started})

    started, metrics = time.time(), {}
    torch.set_rng_state(rng_state)
    model.train()
    bar = tqdm(loader, total=total_steps - step, desc="moco", disable=args.no_progress or not world.is_main,
               leave=False)
    for batch in bar:
        im_q = batch["view_q"].to(world.device, non_blocking=True)
        im_k = batch["view_k"].to(world.device, non_blocking=True)
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, logits, _ = model(im_q, im_k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        top1 = (logits.argmax(dim=1) == 0).float().mean().item()  # positive ranked first among 1+K
        running["loss"] += loss.item()
        running["top1"] += top1
        for key, value in moco.stats.items():  # top1_batch, queue_age_gap: see moco.MoCo
            running[key] += value
        bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{top1:.2f}")
        if step % args.steps_per_epoch == 0 or step == total_steps:
            period = (step - 1) // args.steps_per_epoch + 1
            n = step - (period - 1) * args.steps_per_epoch
            metrics = {k: world.mean(v / n) for k, v in running.items()}
            running = dict.fromkeys(LOGGED, 0.0)
            record = {"epoch": period, "step": step, "lr": schedule.get_last_lr()[0],
                      "elapsed_s": round(elapsed_before + time.time() - started, 1), **metrics}
            if world.is_main:
                log_json(log, record)
                if args.no_progress:
                    print(format_record(record), flush=True)
        if step % args.checkpoint_every == 0 or step == total_steps:
            checkpoint_state(step)
        if args.stop_after_step is not None and step >= args.stop_after_step:
            checkpoint_state(step)
            world.close()
            return {"stopped_at_step": step}
    if world.is_main:
        metrics = {**metrics, "steps": step, "train_wall_time_s": round(elapsed_before + time.time() - started, 1)}
        # The query encoder alone: train_segmentation --init loads it into the segmentation model's encoder.
        save_checkpoint(args.output / FINAL, moco.encoder_q, stage="moco", config=json_safe(vars(args)) | {
            "unlabeled": [str(p) for p in args.unlabeled], "world_size": world.world_size},
            metrics=metrics, manifest=args.manifest, extra={"model_config": config,
                                                            "moco_config": moco.config, **data_note})
    if args.save_rank_states is not None:
        args.save_rank_states.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in moco.state_dict().items()},
                   args.save_rank_states / f"rank{world.rank}.pt")
    if world.is_main:
        print(f"[moco] done: {metrics}", flush=True)
    world.barrier()
    world.close()
    return metrics


if __name__ == "__main__":
    main()
