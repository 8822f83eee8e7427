#!/usr/bin/env python3
"""Side-by-side throughput/latency harness: Triton ensemble vs. in-process pipeline vs. bare model vs. FastAPI.

    python fundus_hemorrhage_perf/bench.py [--url 127.0.0.1:8001 | (starts serve.py itself)] [--protocol grpc|http]
                         [--photos DIR] [--batch 10] [--concurrency 1,2,4,8] [--duration 30] [--warmup 5]
                         [--arms onnx,pipeline,triton,fastapi] [--checkpoint PT] [--label NAME] [--out PREFIX]

Arms, run one after another so that they never share the CPUs:
  onnx      the ceiling: the served model.onnx on ONNX Runtime in this process, one caller, fed the batch of
            already-preprocessed photos again and again (no decoding, no postprocessing, no transport).
  pipeline  fundus_hemorrhage.pipeline (preprocess -> ONNX Runtime -> postprocess) in this process, no server:
            --pipeline-pool thread (default): --pipeline-workers threads (default: the core count), each running
            whole batches end to end, sharing one ONNX Runtime session (--ort-threads intra-op threads);
            OpenCV, PIL decoding and ONNX Runtime release the GIL, so the threads do overlap.
            --pipeline-pool process: that many processes instead, each with its own session
            (--ort-threads / workers intra-op threads each).
  triton    the ensemble, over gRPC (or HTTP), closed loop: each of C clients sends a request of --batch photos,
            waits for the answer, sends the next; for each C in --concurrency. The server's own statistics
            (per model: queue, compute input/infer/output) are read before and after each measurement window.
  fastapi   fundus_hemorrhage_perf/fastapi_baseline.py (uvicorn subprocess, PyTorch eager, the served version's checkpoint),
            same clients and concurrency; its endpoint takes one photo, so a client's "request" is its --batch
            photos POSTed one after another on one keep-alive connection.
Every level: --warmup seconds discarded, then a --duration window (stretched up to 3x until --min-requests
requests have completed); throughput = photos in requests completed inside the window / window length;
latency = those requests' start-to-end time (nearest-rank percentiles). A request is an error unless every
photo comes back with a mask and a `status: ok` report.

Writes PREFIX.json (everything; paths relative to the repository) and PREFIX.md (tables + ratios) and prints the
markdown. The arms are in fundus_hemorrhage_perf/arms.py, the statistics and the report in fundus_hemorrhage_perf/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from fundus_hemorrhage.contract import MAX_BATCH_SIZE
from fundus_hemorrhage.model_config import parameters, read_config
from fundus_hemorrhage_perf.arms import run_fastapi, run_onnx, run_pipeline, run_triton, start_fastapi, weights_check
from fundus_hemorrhage_perf.common import (
    DEFAULT_GLOB, MODEL_REPOSITORY, REPO_ROOT, SAMPLE_PHOTOS, SEGMENTATION_MODEL, load_photos, machine_info, relative,
    served_checkpoint, served_version,
)
from fundus_hemorrhage_ops.local_server import start_triton
from fundus_hemorrhage_perf.report import markdown, ratios

ARMS = ("onnx", "pipeline", "triton", "fastapi")


def git_describe() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}{'+dirty' if dirty else ''}" or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_configs(model_repository: Path) -> dict:
    return {p.parent.name: p.read_text() for p in sorted(model_repository.glob("*/config.pbtxt"))}


# -------------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="running Triton endpoint for --protocol (host:port); default: start serve.py")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                   help="served when this starts the server; the bare-model/pipeline arms read the newest "
                        "unet/<version>/model.onnx from it, the FastAPI arm that version's model.json")
    p.add_argument("--photos", type=Path, default=None,
                   help="photos folder (default: the repository's samples/; the real set, e.g. "
                        "../shared/data/idrid_he/images, for numbers to compare)")
    p.add_argument("--photo-glob", default=DEFAULT_GLOB)
    p.add_argument("--batch", type=int, default=10, help=f"photos per request (1..{MAX_BATCH_SIZE})")
    p.add_argument("--concurrency", default="1,2,4,8", help="client counts to sweep, comma-separated")
    p.add_argument("--fastapi-concurrency", default=None, help="for the FastAPI arm (default: --concurrency)")
    p.add_argument("--duration", type=float, default=30.0, help="measurement window per level, seconds")
    p.add_argument("--warmup", type=float, default=5.0, help="discarded seconds before each window")
    p.add_argument("--min-requests", type=int, default=5,
                   help="stretch a window (up to 3x --duration) until this many requests completed in it")
    p.add_argument("--arms", default=",".join(ARMS), help="which arms to run, comma-separated")
    p.add_argument("--ort-threads", type=int, default=cpus,
                   help="ONNX Runtime intra-op threads for the bare-model arm and the pipeline's session(s) "
                        f"(default: the core count, {cpus})")
    p.add_argument("--pipeline-pool", choices=("thread", "process"), default="thread")
    p.add_argument("--pipeline-workers", type=int, default=cpus, help=f"default: the core count, {cpus}")
    p.add_argument("--onnx", type=Path, default=None, help="default: newest unet/<version>/model.onnx")
    p.add_argument("--threshold", type=float, default=None,
                   help="pipeline/FastAPI threshold (default: the graph's own, i.e. that version's model.json)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="FastAPI arm weights (default: the checkpoint the served version's model.json names)")
    p.add_argument("--fastapi-url", default=None, help="use a running fastapi_baseline.py instead of starting one")
    p.add_argument("--no-weights-check", action="store_true",
                   help="skip comparing the checkpoint's output to the ONNX model's")
    p.add_argument("--probability", action="store_true",
                   help="ensemble requests ask for the PROBABILITY PNG (the pipeline arm makes it too)")
    p.add_argument("--label", default="bench", help="name of this run in the report (e.g. the tuning change)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "fundus_hemorrhage_perf" / "results" / "bench",
                   help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    if args.fastapi_concurrency:
        args.fastapi_concurrency = [int(c) for c in args.fastapi_concurrency.split(",") if c.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        p.error(f"unknown arms: {sorted(unknown)}")
    if not 1 <= args.batch <= MAX_BATCH_SIZE:
        p.error(f"--batch must be within 1..{MAX_BATCH_SIZE} (the ensemble's max_batch_size)")
    return args


def settings(args, photos, onnx_path: Path, threshold: float | None) -> dict:
    """What the report records of this run (paths relative to the repository)."""
    unet_config = args.model_repository / SEGMENTATION_MODEL / "config.pbtxt"
    return {"label": args.label, "batch": args.batch, "concurrency": args.concurrency,
            "duration": args.duration, "warmup": args.warmup, "min_requests": args.min_requests,
            "protocol": args.protocol, "photos_dir": relative(args.photos or SAMPLE_PHOTOS), "photos": len(photos),
            "photo_mb_mean": round(sum(len(b) for _, b in photos) / len(photos) / 2**20, 2),
            "arms": args.arms, "onnx": relative(onnx_path), "threshold": threshold,
            "checkpoint": relative(args.checkpoint), "url": args.url,
            "server_unet_intra_op_threads": parameters(read_config(unet_config)).get("intra_op_threads")
            if unet_config.exists() else None}


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    photos = load_photos(args.photos, args.photo_glob)
    version_dir, meta = served_version(args.model_repository)
    version = int(version_dir.name)
    onnx_path = args.onnx or version_dir / "model.onnx"
    args.checkpoint = args.checkpoint or served_checkpoint(meta)
    results = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": git_describe(),
        "machine": machine_info(),
        "config": settings(args, photos, onnx_path, args.threshold if args.threshold is not None
                           else meta.get("threshold")),
        "model_repository_configs": model_configs(args.model_repository),
        "arms": {},
        "arm_errors": {},
    }
    logs = args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    print(f"bench '{args.label}': {len(photos)} photos, batch {args.batch}, arms {args.arms}, "
          f"concurrency {args.concurrency}, {args.warmup}+{args.duration} s per level", flush=True)

    def arm_onnx():
        results["arms"]["onnx"] = run_onnx(args, photos, onnx_path)
        print(f"  onnx: {results['arms']['onnx']['photos_per_s']:.2f} photos/s", flush=True)

    def arm_pipeline():
        results["arms"]["pipeline"] = run_pipeline(args, photos, onnx_path, version)
        print(f"  pipeline: {results['arms']['pipeline']['photos_per_s']:.2f} photos/s", flush=True)

    def arm_triton():
        server, url = None, args.url
        if url is None:
            print("  starting Triton (serve.py) ...", flush=True)
            server = start_triton(logs / f"{args.out.name}.triton.log", args.model_repository)
            url = server.grpc_url if args.protocol == "grpc" else server.http_url
        try:
            results["arms"]["triton"] = run_triton(args, photos, url, server.process.pid if server else None)
        finally:
            if server is not None:
                server.stop()

    def arm_fastapi():
        if not args.checkpoint.exists():
            raise FileNotFoundError(f"checkpoint {relative(args.checkpoint)} (give one with --checkpoint)")
        if not args.no_weights_check:
            check = results["weights_check"] = weights_check(args.checkpoint, onnx_path, photos)
            if not check["same_weights"]:
                print(f"  WARNING: {check['checkpoint']} and {check['onnx']} disagree (max |dp| "
                      f"{check['max_abs_probability_diff']:.3g}): the FastAPI arm is not running the served weights",
                      flush=True)
        process, url = None, args.fastapi_url
        if url is None:
            process, url = start_fastapi(args, logs / f"{args.out.name}.fastapi.log")
        try:
            results["arms"]["fastapi"] = run_fastapi(args, photos, url)
        finally:
            if process is not None:
                stop(process)

    arm_functions = {"onnx": arm_onnx, "pipeline": arm_pipeline, "triton": arm_triton, "fastapi": arm_fastapi}
    for arm in ARMS:  # fixed order; an arm that fails does not stop the rest
        if arm in args.arms:
            try:
                arm_functions[arm]()
            except Exception as exc:  # noqa: BLE001
                results["arm_errors"][arm] = f"{type(exc).__name__}: {exc}"[:3000]
                print(f"  {arm}: FAILED: {results['arm_errors'][arm]}", file=sys.stderr, flush=True)

    results["ratios"] = ratios(results)
    report = markdown(results)
    json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")
    json_path.write_text(json.dumps(results, indent=2))
    md_path.write_text(report)
    print()
    print(report)
    print(f"wrote {json_path} and {md_path}")
    return 1 if results["arm_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
