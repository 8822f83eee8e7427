"""The ablation, run as one job: MoCo pretraining, then every arm over several seeds with the same budget, then
a refit of the winning recipe on train + val. Sized for one GPU (arms run side by side); works on a CPU too.

    python -m fundus_hemorrhage_training.sweep --data ../shared/data --output runs/sweep            # the model card's run
    python -m fundus_hemorrhage_training.sweep ... --steps 20 --steps-per-eval 10 --moco-steps 10 # a smoke run

Arms (same steps, batch, patch, schedule, EMA; only the init and the unlabeled photos differ):
    random      random init, labelled photos only
    moco        encoder from the MoCo checkpoint, labelled photos only
    moco_mtl    encoder from MoCo, plus reconstruction of unlabeled photos (multi-task)
Selection: the arm and step with the best val pixel AUPR averaged over seeds (not the best single run, which
would be picked for its luck on 4 photos). The refit trains that arm's recipe for that many steps on train + val,
at the mean of its seeds' Dice-optimal thresholds. summary.json holds every curve and the choice.

The issue-11 ablation (random / ImageNet / MoCo from either, each with and without multi-task, on the
EfficientNet-Lite0 U-Net) runs as a resumable queue instead: fundus_hemorrhage_training/run_queue.py and fundus_hemorrhage_training/run_queue.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fundus_hemorrhage.preprocessing import PreprocessConfig

from .common import REPO_ROOT
from .data import load_labelled, load_unlabeled
from .model import ARCHITECTURES, DEFAULT_CHANNELS

ARMS = ("random", "moco", "moco_mtl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with idrid_he/ and fundus_unlabeled/")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=2, help="seeds per arm (default: 2)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of every arm (default: 2000)")
    p.add_argument("--steps-per-eval", type=int, default=250, help="steps between val evaluations (default: 250)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: 16)")
    p.add_argument("--patch", type=int, default=384, help="(default: 384)")
    p.add_argument("--moco-steps", type=int, default=2000, help="(default: 2000)")
    p.add_argument("--moco-batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--workers", type=int, default=2, help="loader processes per arm (default: 2)")
    p.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "preprocessed")
    p.add_argument("--working-size", type=int, default=PreprocessConfig().working_size)
    p.add_argument("--channels", type=int, nargs="+", default=list(DEFAULT_CHANNELS))
    p.add_argument("--architecture", default=ARCHITECTURES[0], choices=ARCHITECTURES,
                   help="encoder of every arm (default: %(default)s)")
    p.add_argument("--deadline-s", type=float, default=3600, help="stop everything after this long, keeping "
                                                                 "the checkpoints so far (default: 3600)")
    p.add_argument("--no-refit", dest="refit", action="store_false")
    p.add_argument("--pack-to", type=Path, default=None,
                   help="also write the logs and checkpoints as tar files of at most 15 MB here")
    return p.parse_args(argv)


class Jobs:
    """Child processes with a shared deadline; each logs to its own file."""

    def __init__(self, deadline: float):
        self.deadline, self.running = deadline, {}

    def start(self, name: str, module: str, args: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", module, *args, "--no-progress"]
        print(f"[sweep] start {name}: {' '.join(cmd)}", flush=True)
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            self.running[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait(self, names: list[str]) -> dict[str, int]:
        codes = {}
        for name in names:
            proc = self.running.pop(name)
            try:
                codes[name] = proc.wait(timeout=max(1.0, self.deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                codes[name] = proc.wait()
                print(f"[sweep] {name} stopped at the deadline", flush=True)
            print(f"[sweep] {name} exited {codes[name]}", flush=True)
        return codes


def read_curve(run: Path) -> dict[int, dict]:
    """step -> val metrics of one run, from its log.jsonl."""
    curve = {}
    log = run / "log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        r = json.loads(line)
        if "val_pixel_aupr" in r:
            curve[r["step"]] = {"aupr": r["val_pixel_aupr"], "threshold": r["val_dice_optimal_threshold"],
                                "elapsed_s": r["elapsed_s"]}
    return curve


def choose(output: Path, seeds: int) -> dict:
    """Per arm: val AUPR averaged over seeds at each step reached by all of them; the best (arm, step)."""
    table = {}
    for arm in ARMS:
        curves = [read_curve(output / f"{arm}_s{s}") for s in range(seeds)]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if all(curves) else []
        table[arm] = {
            "steps": steps,
            "mean_aupr": [float(np.mean([c[t]["aupr"] for c in curves])) for t in steps],
            "std_aupr": [float(np.std([c[t]["aupr"] for c in curves])) for t in steps],
            "per_seed_aupr": [[c[t]["aupr"] for t in steps] for c in curves],
            "mean_threshold": [float(np.mean([c[t]["threshold"] for c in curves])) for t in steps],
        }
    candidates = [(v["mean_aupr"][i], arm, v["steps"][i], v["mean_threshold"][i])
                  for arm, v in table.items() for i in range(len(v["steps"]))]
    best = max(candidates) if candidates else None
    return {"arms": table, "choice": None if best is None else
            {"arm": best[1], "step": best[2], "mean_val_aupr": best[0], "threshold": best[3]}}


def arm_args(arm: str, args: argparse.Namespace, moco_checkpoint: Path) -> list[str]:
    extra = {"random": [], "moco": ["--init", str(moco_checkpoint)],
             "moco_mtl": ["--init", str(moco_checkpoint), "--unlabeled", str(args.data / "fundus_unlabeled")]}
    return extra[arm]


def pack(output: Path, dest: Path, limit: int = 15 * 2**20) -> None:
    """Logs + summary in one tar, checkpoints (best.pt, last.pt) spread over tars of at most `limit` bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "sweep_logs.tar.gz", "w:gz") as tar:
        for p in sorted(output.rglob("*")):
            if p.is_file() and p.suffix in (".jsonl", ".log", ".json"):
                tar.add(p, p.relative_to(output.parent))
    checkpoints = sorted(p for p in output.rglob("*.pt") if p.name in ("best.pt", "last.pt"))
    part, size, tar = 0, 0, None
    for p in checkpoints:
        if tar is None or size + p.stat().st_size > limit:
            if tar is not None:
                tar.close()
            part, size = part + 1, 0
            tar = tarfile.open(dest / f"sweep_checkpoints_{part}.tar", "w")
        tar.add(p, p.relative_to(output.parent))
        size += p.stat().st_size
    if tar is not None:
        tar.close()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    jobs = Jobs(started + args.deadline_s)
    out, manifest = args.output, args.data / "idrid_he" / "manifest.csv"
    out.mkdir(parents=True, exist_ok=True)
    model = ["--working-size", str(args.working_size), "--channels", *map(str, args.channels),
             "--architecture", args.architecture,
             "--cache", str(args.cache)]
    common = model + ["--manifest", str(manifest), "--batch-size", str(args.batch_size), "--patch", str(args.patch),
              "--steps-per-epoch", str(args.steps_per_eval), "--eval-every", "1", "--workers", str(args.workers)]
    epochs = max(1, args.steps // args.steps_per_eval)

    # Fill the preprocessing cache once, before the arms race to write it.
    cache, config = args.cache, PreprocessConfig(working_size=args.working_size)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda load: load(), [lambda: load_labelled(manifest, "train", config, cache),
                                            lambda: load_labelled(manifest, "val", config, cache),
                                            lambda: load_unlabeled(args.data / "fundus_unlabeled", config, cache)]))
    print(f"[sweep] cache ready after {time.time() - started:.0f} s", flush=True)

    moco = out / "moco"
    moco_steps_per_epoch = min(50, args.moco_steps)
    jobs.start("moco", "fundus_hemorrhage_training.pretrain_moco", model + [
        "--unlabeled", str(args.data / "fundus_unlabeled"), "--holdout-manifest", str(manifest),
        "--output", str(moco), "--epochs", str(max(1, args.moco_steps // moco_steps_per_epoch)),
        "--steps-per-epoch", str(moco_steps_per_epoch),
        "--batch-size", str(args.moco_batch_size), "--workers", str(2 * args.workers)], out / "moco.log")
    runs = [(arm, s) for arm in ARMS for s in range(args.seeds)]
    for arm, s in runs:  # arms that need no MoCo start now
        if arm == "random":
            jobs.start(f"{arm}_s{s}", "fundus_hemorrhage_training.train_segmentation",
                       common + ["--epochs", str(epochs), "--seed", str(s), "--output", str(out / f"{arm}_s{s}")],
                       out / f"{arm}_s{s}.log")
    jobs.wait(["moco"])
    for arm, s in runs:
        if arm != "random" and (moco / "last.pt").exists():
            jobs.start(f"{arm}_s{s}", "fundus_hemorrhage_training.train_segmentation",
                       common + ["--epochs", str(epochs), "--seed", str(s), "--output", str(out / f"{arm}_s{s}")]
                       + arm_args(arm, args, moco / "last.pt"), out / f"{arm}_s{s}.log")
    jobs.wait(list(jobs.running))
    summary = choose(out, args.seeds)
    summary["ablation_wall_time_s"] = round(time.time() - started, 1)

    choice = summary["choice"]
    # The refit runs alone, so it is faster than the same steps in the crowd: that time is an upper bound.
    needed = choice and read_curve(out / f"{choice['arm']}_s0").get(choice["step"], {}).get("elapsed_s", 0)
    if args.refit and choice is not None and jobs.deadline - time.time() < needed:
        summary["refit_skipped"] = f"{jobs.deadline - time.time():.0f} s left, the arm needed {needed:.0f} s"
    elif args.refit and choice is not None:
        refit_started = time.time()
        jobs.start("refit", "fundus_hemorrhage_training.train_segmentation", common + [
            "--epochs", str(choice["step"] // args.steps_per_eval), "--seed", "0", "--include-val",
            "--threshold", f"{choice['threshold']:.6f}", "--output", str(out / f"refit_{choice['arm']}")]
            + arm_args(choice["arm"], args, moco / "last.pt"), out / "refit.log")
        summary["refit_exit_code"] = jobs.wait(["refit"])["refit"]
        summary["refit_wall_time_s"] = round(time.time() - refit_started, 1)
    summary["wall_time_s"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    if args.pack_to is not None:
        pack(out, args.pack_to)
    return summary


if __name__ == "__main__":
    main()
