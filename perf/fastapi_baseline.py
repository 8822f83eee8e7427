#!/usr/bin/env python3
"""The naive baseline: one FastAPI endpoint running preprocess + PyTorch-eager U-Net + postprocess per photo.

    python perf/fastapi_baseline.py [--checkpoint runs/supervised/last.pt] [--host 127.0.0.1] [--port 8080]
                                    [--threshold T] [--torch-threads N]

    POST /segment   body: the photo file's bytes (any Content-Type)
                    200 -> {"report": <lesion report, same schema as the ensemble's LESIONS>,
                            "mask_png_b64": <mask PNG, base64>}
                    400 -> {"detail": <why the photo cannot be processed>}
    GET  /health    200 when the model is loaded

What "naive" means here, i.e. what a straightforward implementation does and the ensemble does not:
one photo per request (no batching across requests or photos), PyTorch eager on the training graph
(no ONNX Runtime / graph optimisation), one uvicorn process; the endpoint is a plain `def`, so FastAPI runs
it in its thread pool and concurrent requests run torch concurrently (torch's own intra-op threads:
all cores unless --torch-threads). Same preprocessing/postprocessing code and the same weights as the ensemble.
bench.py starts this as a subprocess for its FastAPI arm.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from postprocess_backend import PostprocessConfig, postprocess  # noqa: E402
from fundus_hemorrhage.preprocessing import ImageError, PreprocessConfig, preprocess  # noqa: E402
from training.model import SegmentationExport, build_model  # noqa: E402

MODEL_NAME, MODEL_VERSION = "unet-torch-eager", "fastapi-baseline"


def load_model(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """The serving graph (sigmoid probability) of a training checkpoint, in eval mode."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return SegmentationExport(model.eval()).eval(), ckpt


def create_app(checkpoint: Path, threshold: float | None = None):
    from fastapi import Body, FastAPI, HTTPException

    model, ckpt = load_model(checkpoint)
    preprocess_config = PreprocessConfig()
    postprocess_config = PostprocessConfig(threshold=float(threshold if threshold is not None
                                                           else ckpt.get("threshold", 0.5)))
    app = FastAPI(title="hemorrhage segmentation - naive FastAPI baseline")

    @app.get("/health")
    def health():
        return {"status": "ok", "checkpoint": str(checkpoint), "threshold": postprocess_config.threshold,
                "torch_threads": torch.get_num_threads()}

    @app.post("/segment")
    def segment(photo: bytes = Body(..., media_type="application/octet-stream")):
        try:
            pre = preprocess(photo, preprocess_config)
        except ImageError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        with torch.inference_mode():
            probability = model(torch.from_numpy(pre.pixels[None]))[0].numpy()
        result = postprocess(np.ascontiguousarray(probability), pre.geometry, postprocess_config,
                             MODEL_NAME, MODEL_VERSION)
        return {"report": result.report, "mask_png_b64": base64.b64encode(result.mask_png).decode("ascii")}

    return app


def main(argv: list[str] | None = None) -> int:
    from perf.common import default_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=default_checkpoint(),
                   help="training checkpoint (default: runs/supervised/last.pt, else /tmp/run_smoke/last.pt)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's own, else 0.5")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import uvicorn

    uvicorn.run(create_app(args.checkpoint, args.threshold), host=args.host, port=args.port,
                log_level=args.log_level, workers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
