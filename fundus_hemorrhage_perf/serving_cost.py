"""What a candidate architecture would cost to serve, before anything is trained on it.

Each variant (a model config, random weights: latency does not depend on their values) is exported with
fundus_hemorrhage_ops.engines.export at its working size, quantised to int8 with engines.int8.quantize_int8 (the
served recipe: static QDQ, per-channel weights, calibrated on real training photos preprocessed as served), and
timed on ONNX Runtime through fundus_hemorrhage.onnx_session.create_session(threads) at one batch size, beside the
shipped unet version 2. Photos/s is the U-Net alone; the ensemble adds preprocess and postprocess.

    python -m fundus_hemorrhage_perf.serving_cost --output fundus_hemorrhage_perf/results/training-lite0-latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.onnx_session import create_session, run

from fundus_hemorrhage_training.common import DEFAULT_DATA, REPO_ROOT
from fundus_hemorrhage_training.data import read_manifest
from fundus_hemorrhage_training.model import build_model

# name -> (model config, working size)
VARIANTS = {
    "lite0_w1.0_fr8_640": ({"architecture": "efficientnet-lite0", "width": 1.0, "full_resolution_channels": 8}, 640),
    "lite0_w1.0_fr0_640": ({"architecture": "efficientnet-lite0", "width": 1.0, "full_resolution_channels": 0}, 640),
    "lite0_w0.5_fr8_640": ({"architecture": "efficientnet-lite0", "width": 0.5, "full_resolution_channels": 8}, 640),
    "lite0_w1.0_fr8_512": ({"architecture": "efficientnet-lite0", "width": 1.0, "full_resolution_channels": 8}, 512),
}


def time_sessions(paths: dict[str, tuple[Path, int]], batch: int, threads: int, rounds: int) -> dict:
    """name -> seconds per batch of `batch` random photos: min and median over `rounds` rounds, each round
    timing every model once in turn (on a shared machine, interleaving spreads the others' load evenly)."""
    sessions = {name: (create_session(path, threads), size) for name, (path, size) in paths.items()}
    rng = np.random.default_rng(0)
    feeds = {name: rng.random((batch, 3, size, size), dtype=np.float32) for name, (_, size) in sessions.items()}
    times = {name: [] for name in sessions}
    for name, (session, _) in sessions.items():
        run(session, feeds[name])  # warm-up
    for _ in range(rounds):
        for name, (session, _) in sessions.items():
            t = time.perf_counter()
            run(session, feeds[name])
            times[name].append(time.perf_counter() - t)
    return {name: {"batch_s_min": round(min(t), 4), "batch_s_median": round(statistics.median(t), 4),
                   "photos_per_s_at_min": round(batch / min(t), 2), "rounds": rounds} for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--manifest", type=Path, default=DEFAULT_DATA / "idrid_he" / "manifest.csv",
                   help="int8 calibration photos: the first --calibration of its train split")
    p.add_argument("--calibration", type=int, default=8)
    p.add_argument("--reference", type=Path, default=REPO_ROOT / "model_repository" / c.SEGMENTATION_MODEL / "2")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)

    from fundus_hemorrhage_ops.engines.int8 import PhotoCalibrationReader, quantize_int8
    from fundus_hemorrhage_ops.engines.export import export_onnx

    photos = [r.image for r in read_manifest(args.manifest) if r.split == "train"][:args.calibration]
    results = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "batch": args.batch,
               "note": "U-Net alone on ONNX Runtime (create_session), random input, models timed in turn; the "
                       "machine is shared, so the minimum is the fairest figure and ratios matter more than "
                       "absolute values", "variants": {}}
    paths = {}
    for name, onnx_name in (("v2_int8", "model.onnx"), ("v2_fp32", "model_fp32.onnx")):
        if (args.reference / onnx_name).exists():
            paths[name] = (args.reference / onnx_name, c.WORKING_SIZE)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            config, size = VARIANTS[name]
            model = build_model(config).eval()
            fp32 = export_onnx(model, Path(tmp) / f"{name}.onnx", size)
            int8 = Path(tmp) / f"{name}_int8.onnx"
            quantize_int8(fp32, int8, PhotoCalibrationReader(photos, size))
            paths[f"{name}_fp32"], paths[f"{name}_int8"] = (fp32, size), (int8, size)
            results["variants"][name] = {
                "working_size": size, "model_config": config,
                "parameters_served": sum(v.numel() for k, v in model.state_dict().items()
                                         if not k.startswith("reconstruction") and "num_batches" not in k)}
        results["timings"] = time_sessions(paths, args.batch, args.threads, args.rounds)
    reference = results["timings"].get("v2_int8", {}).get("batch_s_min")
    for name, t in results["timings"].items():
        if reference:
            t["relative_to_v2_int8"] = round(t["batch_s_min"] / reference, 2)
        print(name, t, flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
