"""Training that survives the machine: resumable state, a step-indexed data order, and a log that matches it.

A run folder holds
- `state.pt`: everything the next step depends on (model, optimiser, schedule, EMA, step, torch RNG, running loss
  sums, best score so far), written atomically every `--checkpoint-every` steps and at the end;
- `log.jsonl`: one JSON record per logging period; on resume, records past the resumed step are dropped (they were
  written after the state that is being resumed, and will be written again);
- `last.pt`: the final model; its presence means the run is finished.

The data order does not depend on when a run was interrupted: the batch of global step s is the dataset items
s*B*W + rank*B + [0, B) (B: batch per process, W: processes), and every item's augmentation is seeded by its index
(fundus_hemorrhage_training.data.PatchDataset), so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import Sampler

from .common import load_checkpoint

STATE = "state.pt"
FINAL = "last.pt"
LOG = "log.jsonl"


class StepSampler(Sampler[int]):
    """Dataset indices for steps [start_step, total_steps) of one process, in order (see the module docstring)."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0, world_size: int = 1, rank: int = 0):
        self.total_steps, self.batch_size, self.start_step = total_steps, batch_size, start_step
        self.world_size, self.rank = world_size, rank

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            first = (step * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.batch_size


def save_state(folder: Path, step: int, objects: dict, extra: dict | None = None) -> Path:
    """Write folder/state.pt atomically: each object's state_dict(), the step, the torch RNG state and `extra`."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"step": step, "rng": torch.get_rng_state(), "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "state_dicts": {name: obj.state_dict() for name, obj in objects.items()}, "extra": extra or {}}
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = folder / (STATE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(folder / STATE)
    return folder / STATE


def load_state(folder: Path, objects: dict) -> tuple[int, dict] | None:
    """Restore every object from folder/state.pt and the torch RNG; (step, extra), or None without a state.
    Raises KeyError if the state lacks one of `objects` (a state of another kind of run)."""
    path = folder / STATE
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    for name, obj in objects.items():
        obj.load_state_dict(payload["state_dicts"][name])
    torch.set_rng_state(payload["rng"])
    if "cuda_rng" in payload and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return int(payload["step"]), payload["extra"]


def truncate_log(folder: Path, step: int) -> None:
    """Drop the log records written after `step` (a resumed run writes them again)."""
    path = folder / LOG
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def is_finished(folder: Path) -> bool:
    return (folder / FINAL).exists()


def finished_metrics(folder: Path) -> dict | None:
    """The metrics of the finished run in `folder` (its FINAL checkpoint exists), after saying so; else None."""
    if not is_finished(folder):
        return None
    print(f"{folder} is finished ({FINAL} exists): nothing to do", flush=True)
    return load_checkpoint(folder / FINAL)["metrics"]
