#!/usr/bin/env python3
"""The naive baseline: one FastAPI endpoint running preprocess + PyTorch-eager U-Net + postprocess per photo.

    python fundus_hemorrhage_perf/fastapi_baseline.py [--checkpoint checkpoints/NAME.pt] [--host 127.0.0.1] [--port 8080]
                                    [--threshold T] [--torch-threads N] [--model-repository model_repository]

    POST /segment   body: the photo file's bytes (any Content-Type)
                    200 -> {"report": <lesion report, same schema as the ensemble's LESIONS>,
                            "mask_png_b64": <mask PNG, base64>}
                    400 -> {"detail": <why the photo cannot be processed>}
    GET  /health    200 when the model is loaded

It stands in for the served unet version (the newest in the model repository): by default that version's
training checkpoint (its model.json's "checkpoint", under checkpoints/), its threshold and its version number,
so its reports read like the ensemble's. What "naive" means here, i.e. what a straightforward implementation does
and the ensemble does not: one photo per request (no batching across requests or photos), PyTorch eager on the
training graph (no ONNX Runtime / graph optimisation), one uvicorn process; the endpoint is a plain `def`, so
FastAPI runs it in its thread pool and concurrent requests run torch concurrently (torch's own intra-op threads:
all cores unless --torch-threads). The same serving-path code (fundus_hemorrhage.pipeline) as everywhere else.
bench.py starts this as a subprocess for its FastAPI arm.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fundus_hemorrhage.pipeline import Pipeline, with_identity
from fundus_hemorrhage.preprocessing import ImageError
from fundus_hemorrhage_perf.common import MODEL_REPOSITORY, served_checkpoint, served_version
from fundus_hemorrhage_ops.engines.export import load_model as load_trained
from fundus_hemorrhage_training.model import SegmentationExport

# FastAPI runs a plain `def` endpoint in anyio's thread pool (40 threads by default): as many pre/postprocessing
# threads, so that concurrent requests never wait for one here.
PIPELINE_THREADS = 40


def load_model(checkpoint: Path) -> torch.nn.Module:
    """The serving graph (sigmoid probability) of a training checkpoint, in eval mode."""
    model, _ = load_trained(checkpoint)
    return SegmentationExport(model).eval()


def torch_probability(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """PIXELS float32 [N, 3, S, S] -> PROBABILITY float32 [N, 1, S, S], PyTorch eager."""
    def probability(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(pixels)).numpy()
    return probability


def create_app(checkpoint: Path, version: int, threshold: float):
    from fastapi import Body, FastAPI, HTTPException

    pipeline = Pipeline(with_identity(torch_probability(load_model(checkpoint)), version, threshold),
                        threads=PIPELINE_THREADS)
    app = FastAPI(title="haemorrhage segmentation - naive FastAPI baseline")

    @app.get("/health")
    def health():
        return {"status": "ok", "checkpoint": str(checkpoint), "version": version, "threshold": threshold,
                "torch_threads": torch.get_num_threads()}

    @app.post("/segment")
    def segment(photo: bytes = Body(..., media_type="application/octet-stream")):
        try:
            (result,) = pipeline([photo])
        except ImageError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {"report": result.report, "mask_png_b64": base64.b64encode(result.mask_png).decode("ascii")}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                   help="whose newest unet version this stands in for (default: the repository's)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="training checkpoint (default: the one the served version's model.json names)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--threshold", type=float, default=None, help="default: the served version's model.json")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    version_dir, meta = served_version(args.model_repository)
    checkpoint = args.checkpoint or served_checkpoint(meta)
    threshold = args.threshold if args.threshold is not None else float(meta["threshold"])
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import uvicorn

    uvicorn.run(create_app(checkpoint, int(version_dir.name), threshold), host=args.host, port=args.port,
                log_level=args.log_level, workers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
