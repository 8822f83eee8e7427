"""A queue of training runs that finishes over one or more sessions (issue 11, item 5).

The queue file (TOML, e.g. fundus_hemorrhage_training/run_queue.toml) lists runs in order:

    [defaults]                       # arguments every run of a kind gets
    data = "../shared/data"          # relative paths are relative to the repository
    output = "runs/queue"
    segmentation = ["--architecture", "efficientnet-lite0", "--patch", "384", ...]
    pretrain = ["--architecture", "efficientnet-lite0", ...]

    [[run]]
    name = "imagenet_s0"             # run folder output/name
    arm = "imagenet"                 # see ARMS
    seed = 0
    steps = 1000                     # the budget: steps (x steps_per_epoch periods), cosine planned over them
    init = "moco_random_pretrain"    # (MoCo arms) the pretraining run whose encoder they start from

Each run is a child process (python -m fundus_hemorrhage_training.train_segmentation or fundus_hemorrhage_training.pretrain_moco) writing into its own
folder; runs are resumable (fundus_hemorrhage_training.resumable), so the queue simply starts every unfinished run in order: a
finished run (last.pt) is skipped, a partial one continues from its state.pt. A run whose `init` run is not finished
waits (it is skipped this pass). A run that fails (exit code in queue.jsonl) is left partial and the queue moves
on; the next start resumes it. Start it in the background and start it again after the machine went away:

    nohup python -m fundus_hemorrhage_training.run_queue fundus_hemorrhage_training/run_queue.toml > runs/queue.out 2>&1 &
    python -m fundus_hemorrhage_training.run_queue fundus_hemorrhage_training/run_queue.toml --status        # what is finished, partial, waiting
    python -m fundus_hemorrhage_training.run_queue fundus_hemorrhage_training/run_queue.toml --summary fundus_hemorrhage_perf/results/training-ablation.json

Events go to output/queue.jsonl; each run's console output to output/<name>.log. One queue per output folder
(output/queue.lock holds the pid of the running one). SIGTERM stops the current child (it resumes next time).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from .common import REPO_ROOT
from .resumable import FINAL, STATE, is_finished

# arm -> (kind, extra arguments); "{data}" and "{init}" are filled in per run.
ARMS = {
    "pretrain_random": ("pretrain", ["--unlabeled", "{data}/fundus_unlabeled", "--manifest",
                                     "{data}/idrid_he/manifest.csv"]),
    "pretrain_imagenet": ("pretrain", ["--imagenet", "--unlabeled", "{data}/fundus_unlabeled", "--manifest",
                                       "{data}/idrid_he/manifest.csv"]),
    "random": ("segmentation", []),
    "imagenet": ("segmentation", ["--imagenet"]),
    "moco_random": ("segmentation", ["--init", "{init}"]),
    "moco_imagenet": ("segmentation", ["--init", "{init}"]),
}
# Each segmentation arm also with the multi-task reconstruction decoder (unlabeled photos: reconstruction only).
MULTITASK = ["--unlabeled", "{data}/fundus_unlabeled"]
for _arm in [a for a, (kind, _) in ARMS.items() if kind == "segmentation"]:
    ARMS[f"{_arm}_mtl"] = ("segmentation", ARMS[_arm][1] + MULTITASK)
MODULES = {"segmentation": "fundus_hemorrhage_training.train_segmentation", "pretrain": "fundus_hemorrhage_training.pretrain_moco"}


def resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def read_queue(path: Path) -> tuple[dict, list[dict]]:
    """(defaults, runs) of a queue file; ValueError for an unknown arm, a duplicate name or a missing init."""
    spec = tomllib.loads(Path(path).read_text())
    defaults, runs = spec.get("defaults", {}), spec.get("run", [])
    names = set()
    for run in runs:
        if run["arm"] not in ARMS:
            raise ValueError(f"run {run['name']}: unknown arm {run['arm']!r} (known: {', '.join(ARMS)})")
        if run["name"] in names:
            raise ValueError(f"run {run['name']} listed twice")
        if "{init}" in " ".join(ARMS[run["arm"]][1]) and run.get("init") not in names:
            raise ValueError(f"run {run['name']}: arm {run['arm']} needs init = <an earlier pretraining run>")
        names.add(run["name"])
    return defaults, runs


def command(run: dict, defaults: dict) -> list[str]:
    """The child's command line: module, the kind's defaults, the arm's arguments, seed, budget, output."""
    kind, extra = ARMS[run["arm"]]
    # Paths as written in the queue file (children run in the repository): relative ones stay relative in the
    # checkpoints' recorded configs.
    output = Path(defaults.get("output", "runs/queue"))
    fill = {"data": str(defaults.get("data", "../shared/data")), "init": str(output / str(run.get("init")) / FINAL)}
    steps_per_epoch = int(run.get("steps_per_epoch", defaults.get("steps_per_epoch", 50)))
    if run["steps"] % steps_per_epoch:
        raise ValueError(f"run {run['name']}: steps {run['steps']} is not a multiple of {steps_per_epoch}")
    args = [*[a.format(**fill) for a in [*defaults.get(kind, []), *extra, *run.get("args", [])]],
            "--seed", str(run["seed"]), "--steps-per-epoch", str(steps_per_epoch),
            "--epochs", str(run["steps"] // steps_per_epoch), "--output", str(output / run["name"]), "--no-progress"]
    return [sys.executable, "-m", MODULES[kind], *args]


def status(run: dict, defaults: dict) -> str:
    folder = resolve(defaults.get("output", "runs/queue")) / run["name"]
    if is_finished(folder):
        return "finished"
    if (folder / STATE).exists():
        return "partial"
    return "waiting"


def log_event(output: Path, **record) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "queue.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}) + "\n")


def acquire_lock(output: Path) -> bool:
    """True if this process now holds output/queue.lock (a lock left by a dead process is taken over)."""
    output.mkdir(parents=True, exist_ok=True)
    lock = output / "queue.lock"
    if lock.exists():
        try:
            os.kill(int(lock.read_text().strip()), 0)
            return False  # a live queue owns this folder
        except (ValueError, ProcessLookupError, PermissionError):
            pass
    lock.write_text(str(os.getpid()))
    return True


def run_queue(queue_file: Path, only: list[str] | None = None) -> dict[str, str]:
    """Run every unfinished run in order (one at a time); returns name -> status after the pass."""
    defaults, runs = read_queue(queue_file)
    output = resolve(defaults.get("output", "runs/queue"))
    if not acquire_lock(output):
        raise SystemExit(f"another queue is running on {output} (pid in {output / 'queue.lock'})")
    child: list[subprocess.Popen] = []

    def stop(signum, frame):  # pass the stop on; the child's last state.pt is where it resumes
        for p in child:
            p.send_signal(signal.SIGTERM)
        log_event(output, event="stopped", signal=signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        for run in runs:
            if only and run["name"] not in only:
                continue
            if status(run, defaults) == "finished":
                continue
            init = run.get("init")
            if init and not is_finished(output / init):
                log_event(output, event="skipped", run=run["name"], reason=f"{init} is not finished")
                continue
            cmd = command(run, defaults)
            log_event(output, event="start", run=run["name"], resume=status(run, defaults) == "partial",
                      command=[str(Path(c).relative_to(REPO_ROOT)) if c.startswith(str(REPO_ROOT)) else c
                               for c in cmd[1:]])
            started = time.time()
            with open(output / f"{run['name']}.log", "a") as log:
                child[:] = [subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)]
                code = child[0].wait()
            child.clear()
            log_event(output, event="end", run=run["name"], exit_code=code, wall_s=round(time.time() - started, 1))
    finally:
        (output / "queue.lock").unlink(missing_ok=True)
    return {run["name"]: status(run, defaults) for run in runs}


def summary(queue_file: Path) -> dict:
    """Finished segmentation runs' val scores (last.pt), per run and per arm (mean, sd over seeds, n)."""
    from .common import load_checkpoint

    defaults, runs = read_queue(queue_file)
    output = resolve(defaults.get("output", "runs/queue"))
    per_run, per_arm = {}, {}
    for run in runs:
        folder = output / run["name"]
        if ARMS[run["arm"]][0] != "segmentation" or not is_finished(folder):
            continue
        ckpt = load_checkpoint(folder / FINAL)
        m = ckpt["metrics"]
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
        per_run[run["name"]] = {"arm": run["arm"], "seed": run["seed"], "steps": run["steps"],
                                "threshold": ckpt.get("threshold"), "wall_s": m.get("train_wall_time_s"),
                                **{k: m.get(k) for k in ("pixel_aupr", "dice", "lesion_sensitivity",
                                                         "lesion_precision", "images")},
                                "log": [{k: r[k] for k in ("step", "elapsed_s", "loss_seg", "loss_rec",
                                                           "val_pixel_aupr", "val_dice_optimal_threshold")
                                         if k in r} for r in log]}
        per_arm.setdefault((run["arm"], run["steps"]), []).append(m["pixel_aupr"])
    arms = {f"{arm}@{steps}": {"n": len(v), "mean_pixel_aupr": float(np.mean(v)),
                               "sd_pixel_aupr": float(np.std(v, ddof=1)) if len(v) > 1 else None}
            for (arm, steps), v in per_arm.items()}
    queue_path = Path(queue_file).resolve()
    name = str(queue_path.relative_to(REPO_ROOT)) if queue_path.is_relative_to(REPO_ROOT) else queue_path.name
    pending = {run["name"]: status(run, defaults) for run in runs if status(run, defaults) != "finished"}
    return {"queue": name, "runs": per_run, "arms": arms, "not_finished": pending}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queue", type=Path, help="queue file (TOML)")
    p.add_argument("--only", nargs="+", default=None, help="run only these names (in queue order)")
    p.add_argument("--status", action="store_true", help="print each run's status and exit")
    p.add_argument("--summary", type=Path, nargs="?", const=Path("-"), default=None,
                   help="write finished runs' scores as JSON to this file ('-' or nothing: print) and exit")
    args = p.parse_args(argv)
    if args.status:
        defaults, runs = read_queue(args.queue)
        for run in runs:
            print(f"{run['name']:32s} {run['arm']:20s} seed {run['seed']}  {run['steps']:6d} steps  "
                  f"{status(run, defaults)}")
        return
    if args.summary is not None:
        text = json.dumps(summary(args.queue), indent=1)
        if str(args.summary) == "-":
            print(text)
        else:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(text + "\n")
        return
    print(json.dumps(run_queue(args.queue, args.only), indent=1), flush=True)


if __name__ == "__main__":
    main()
