#!/usr/bin/env python3
"""Build a new `unet` version folder for Triton from a training checkpoint: ONNX (CPU) or a TensorRT plan (GPU).

    python build_engines.py --target cpu [--model-repository model_repository] [--checkpoint CKPT]
                            [--version N] [--int8 | --precision {auto,fp32,int8}] [--manifest CSV]
    python build_engines.py --target tensorrt [--checkpoint CKPT | --onnx PATH|latest] [--strongly-typed]

Checkpoint: by default the one behind the newest version (its model.json's "checkpoint", a path inside
checkpoints/). Steps, each of which stops the build (exit 2, one line on stderr) when it fails:

  cpu       export ONNX (dynamic batch, the contract's I/O names) -> onnx.checker -> ONNX Runtime (serving
            session) vs PyTorch through Polygraphy's Comparator on real preprocessed photos (samples/*.jpg)
            -> with --int8: static QDQ quantization (per-channel weights) calibrated on the manifest's first
            --calibration-images *training* photos, both graphs evaluated on `val` along the serving path; INT8
            ships only if the val pixel AUPR drops by at most --int8-max-aupr-drop (0.01), else FP32 ships and
            the figures are recorded. model.json records the calibration set (ids, SHA-256 of the files, the
            preprocessing they went through: int8.calibration), and calibration.json beside it the result,
            each quantised activation's scale and zero point (the calibration cache, as TensorRT's).
            Rebuilding the newest version's checkpoint keeps its precision, quantizes with exactly that
            version's calibration cache (its recorded photos need not exist; the log names those missing or
            changed; a version without a cache calibrates again on its recorded set, found by id in --manifest
            and checked by hash, and stops naming any photo missing or changed; --recalibrate draws anew and
            ignores both) and must serve the same masks (fp32: identical; int8: Dice >= 0.99 and
            probabilities within 1/255 on >= 99.5 % of each photo's pixels, since int8 rounding differs between
            CPUs: fundus_hemorrhage_ops/engines/parity.py).
  tensorrt  needs an NVIDIA GPU, CUDA and TensorRT. FP16 plan built with Polygraphy (optimisation profile
            batch 1..max_batch_size), compared with ONNX Runtime FP32, then config.pbtxt becomes
            platform "tensorrt_plan".

Every graph in the version folder carries the version's THRESHOLD and MODEL_VERSION outputs. The folder is
assembled as unet/.building-N and renamed to unet/N only once every check passed, so Triton never sees half a
version. model.json = the checkpoint's metadata + precision + preprocessing (the plan its PIXELS need, checked
by serving: fundus_hemorrhage_ops/engines/plan.py) + build + parity (+ int8). The code lives in
fundus_hemorrhage_ops.engines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
# Developer defaults of this command (the package reads no default location).
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "idrid_he" / "manifest.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["cpu", "tensorrt"], required=True)
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--checkpoint", type=Path, help="default: the checkpoint of the newest version")
    p.add_argument("--checkpoints-dir", type=Path, default=REPO_ROOT / "checkpoints",
                   help="where model.json's checkpoint names are looked up (default: checkpoints/)")
    p.add_argument("--onnx", help="tensorrt: build from this FP32 ONNX (or 'latest' shipped) instead of a checkpoint")
    p.add_argument("--version", type=int, help="version folder to write (default: the next number)")
    p.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto",
                   help="cpu: auto = the newest version's precision when rebuilding its checkpoint, else fp32")
    p.add_argument("--int8", action="store_true", help="cpu: same as --precision int8")
    p.add_argument("--working-size", type=int, help="default: the checkpoint's training working size")
    p.add_argument("--max-batch-size", type=int, help="default: the current config.pbtxt's, else the contract's")
    p.add_argument("--opt-batch", type=int, default=4, help="tensorrt: batch size the profile optimises for")
    p.add_argument("--strongly-typed", action="store_true",
                   help="tensorrt: FP16 ONNX + strongly typed network even where the fp16 flag exists")
    p.add_argument("--parity-images", type=Path, nargs="+", help="photos for the parity checks (default: samples/)")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                   help="int8: calibration (train) and gate (val) photos (default: ../shared/data/idrid_he/)")
    p.add_argument("--calibration-images", type=int, default=16,
                   help="int8: training photos to calibrate on (a rebuild uses the version's calibration cache)")
    p.add_argument("--recalibrate", action="store_true",
                   help="int8 rebuild: draw a new calibration set from --manifest, ignoring the version's "
                        "calibration cache and recorded photos")
    p.add_argument("--int8-max-aupr-drop", type=float,
                   help="int8 ships if the val pixel AUPR drops by at most this (default: engines.int8's, 0.01)")
    p.add_argument("--allow-mask-change", action="store_true",
                   help="ship a rebuild of the newest version's checkpoint even if it serves other masks (recorded)")
    p.add_argument("--verbose", action="store_true", help="Polygraphy's own log too")
    args = p.parse_args(argv)
    if not args.parity_images:
        args.parity_images = sorted((REPO_ROOT / "samples").glob("IDRiD_*[0-9].jpg"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fundus_hemorrhage_ops.engines import BuildError
    from fundus_hemorrhage_ops.engines.build import build
    try:
        result = build(args)
    except BuildError as exc:
        print(f"build_engines.py: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"build_engines: wrote {result['folder']} ({result['precision']}, {args.target})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
