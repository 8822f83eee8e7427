#!/usr/bin/env python3
"""Where one 10-photo request's time goes, stage by stage: the ensemble's own functions, in this process.

    python fundus_hemorrhage_perf/stage_profile.py [--photos DIR] [--batch 10] [--repeats 3] [--out PREFIX]

The request runs through `fundus_hemorrhage.steps` (what the preprocess and postprocess models call) and the
served unet on ONNX Runtime, on one thread (an inline executor instead of the adapters' pools), under cProfile.
Each stage's time is the cumulative time of the function that does it, so nothing here restates how a step is
built: a stage that moves to another function shows up as missing, not as a wrong number. CPU time per request,
not wall time: the served steps run two photos at a time, so a stage's wall time is about half of this where it
parallelises. The transport (gRPC, the Python backend's shared memory) is not in this process: `bench.py`'s
server statistics and the py-spy profile of the stubs (`--py-spy`, see the README) cover it.

Writes PREFIX.json and PREFIX.md (the table) and prints the markdown.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
from concurrent.futures import Executor, Future
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.anatomy import AnatomyDetector
from fundus_hemorrhage.onnx_session import create_session, run
from fundus_hemorrhage.postprocessing import PostprocessConfig
from fundus_hemorrhage.preprocessing import PreprocessConfig
from fundus_hemorrhage.steps import answer_photos, read_photos
from fundus_hemorrhage_perf.common import load_photos, machine_info, relative, served_version

# (stage, module file suffix, function name): the function whose cumulative time is the stage's.
STAGES = (
    ("header + JPEG quality (PIL)", "preprocessing.py", "read_header_and_jpeg_quality"),
    ("completeness (end marker scan)", "preprocessing.py", "_check_complete"),
    ("decode (libjpeg-turbo, 1/4 scale)", "jpeg.py", "decode_bgr"),
    ("field of view", "preprocessing.py", "find_field_of_view"),
    ("quality gate (metrics)", "quality.py", "measure"),
    ("exposure gain", "quality.py", "apply_exposure_gain"),
    ("crop + resize to 640", "preprocessing.py", "to_working"),
    ("CLAHE", "preprocessing.py", "_clahe"),
    ("FOV mask on the grid", "preprocessing.py", "working_fov_mask"),
    ("preprocess, whole photo", "steps.py", "read_photo"),
    ("optic disc + fovea detector", "anatomy.py", "__call__"),
    ("preprocess step: photos, detector, tensors", "steps.py", "read_photos"),
    ("unet (ONNX Runtime)", "stage_profile.py", "unet"),
    ("threshold + upsample to full size + lesions", "postprocessing.py", "find_lesions"),
    ("  of which bilinear warps", "postprocessing.py", "_warp_window"),
    ("mask PNG encoding", "png.py", "encode_png"),
    ("report (retinal frame, zones)", "report.py", "lesion_report"),
    ("postprocess, whole photo", "steps.py", "answer_photo"),
    ("report JSON", "__init__.py", "dumps"),
)


class InlineExecutor(Executor):
    """Runs each task at once on the calling thread, so that cProfile sees it."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def unet(session, pixels) -> dict:
    return run(session, pixels)  # its own name: the detector calls onnx_session.run too


def one_request(images, pre_config, post_config, detector, session, pool) -> int:
    batch = read_photos(images, pre_config, pool, detector)
    out = unet(session, batch.pixels)
    results = answer_photos(out[c.PROBABILITY], out[c.THRESHOLD], out[c.MODEL_VERSION], batch.geometry,
                            batch.anatomy, batch.errors, batch.quality, post_config, False, pool)
    return sum(len(json.dumps(r.report)) for r in results)


def stage_times(stats: pstats.Stats, requests: int) -> list[dict]:
    """ms per request of each STAGES function (cumulative time, summed over its call sites)."""
    rows = []
    for stage, file_suffix, name in STAGES:
        total, calls = 0.0, 0
        for (path, _, func), (_, ncalls, _, cumulative, _) in stats.stats.items():
            if func == name and path.endswith(file_suffix):
                total, calls = total + cumulative, calls + ncalls
        rows.append({"stage": stage, "function": f"{file_suffix}:{name}", "ms_per_request": 1e3 * total / requests,
                     "calls_per_request": calls / requests})
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Per-stage profile of one {result['batch']}-photo request (CPU time, one thread)", "",
             f"{result['time']} · {result['machine']['cpu_count']} CPUs · load avg at start "
             f"{result['machine'].get('loadavg_1m_5m_15m', [float('nan')])[0]:.2f} · photos {result['photos']} · unet {result['onnx']} · "
             f"{result['requests']} requests profiled after one warm-up", "",
             "| stage | function | ms / request | calls / request |", "|---|---|---:|---:|"]
    for row in result["stages"]:
        lines.append(f"| {row['stage']} | `{row['function']}` | {row['ms_per_request']:.1f} | "
                     f"{row['calls_per_request']:g} |")
    lines += ["", f"Whole request (profiled, incl. cProfile's own overhead): {result['request_ms']:.1f} ms."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=None, help="default: the repository's samples/")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="requests profiled (after one unprofiled warm-up)")
    p.add_argument("--onnx", type=Path, default=None, help="default: the served unet version's model.onnx")
    p.add_argument("--ort-threads", type=int, default=1, help="intra-op threads of the unet session")
    p.add_argument("--out", type=Path, default=None, help="write PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)

    photos = load_photos(args.photos)
    images = np.array([photos[i % len(photos)][1] for i in range(args.batch)], dtype=np.object_)
    onnx = args.onnx or served_version()[0] / "model.onnx"
    session, detector = create_session(onnx, args.ort_threads), AnatomyDetector(threads=1)
    pre_config, post_config, pool = PreprocessConfig(), PostprocessConfig(), InlineExecutor()
    one_request(images, pre_config, post_config, detector, session, pool)  # warm-up: sessions, caches
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.repeats):
        one_request(images, pre_config, post_config, detector, session, pool)
    profile.disable()
    stats = pstats.Stats(profile)
    result = {"time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine_info(),
              "photos": relative(args.photos) or "samples", "batch": args.batch, "requests": args.repeats,
              "onnx": relative(onnx), "ort_threads": args.ort_threads,
              "request_ms": 1e3 * stats.total_tt / args.repeats, "stages": stage_times(stats, args.repeats)}
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
