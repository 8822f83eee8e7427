"""Distributed setup, logging and checkpoints shared by every training entry point.

Each entry point runs as one process or under `torchrun --nproc_per_node=K`: gloo on the CPU, nccl on a GPU.
Rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fundus_hemorrhage.files import replaced_atomically

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"


class Distributed:
    """World of one (plain `python -m ...`) or of torchrun's WORLD_SIZE processes."""

    def __init__(self, device: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def set_cpu_threads(world_size: int) -> None:
    # Several ranks on one small CPU must share its cores rather than each take them all.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def start_world(device: str, threads: int | None, seed: int) -> Distributed:
    """A run's process world on `device` ("auto", "cuda", "cpu"), its CPU threads (`threads`, else this rank's
    share of the cores) and torch's seed."""
    world = Distributed(device)
    set_cpu_threads(world.world_size)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return world


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def save_checkpoint(path: Path, model: torch.nn.Module, *, stage: str, config: dict, metrics: dict,
                    manifest: Path | None = None, extra: dict | None = None) -> None:
    """A checkpoint that explains itself: weights + model config + run config + data hash + commit + metrics."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "stage": stage,
        "model_config": getattr(model, "config", {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "metrics": metrics,
        "manifest_sha256": file_hash(manifest) if manifest and Path(manifest).exists() else None,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    with replaced_atomically(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# The operating threshold of a model that has none chosen on validation data yet (p = 0.5, the sigmoid's midpoint).
UNTUNED_THRESHOLD = 0.5


def checkpoint_threshold(ckpt: dict) -> float:
    """The threshold a training run chose (Dice-optimal on its validation photos), else UNTUNED_THRESHOLD."""
    return float(ckpt.get("threshold", UNTUNED_THRESHOLD))


def json_safe(config: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}


def log_json(path: Path | None, record: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def format_record(record: dict) -> str:
    """One log record as a console line: key=value, floats to 4 significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
