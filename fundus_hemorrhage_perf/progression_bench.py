"""Latency of a 2-photo comparison through the real Triton server (hemorrhage_progression), against the
ensemble alone on the same two photos and registration alone in this process.

    python -m fundus_hemorrhage_perf.progression_bench                 # starts serve.py, samples/*.jpg
    python -m fundus_hemorrhage_perf.progression_bench --url 127.0.0.1:8001 --photos DIR --requests 20

Each request is one pair (a photo and a synthetic second visit of it: homography warp, other illumination, JPEG
92; fundus_hemorrhage_perf.synthetic_pairs), sent one after the other over gRPC (one client: the latency a
clinician waits for). Target (issue 22): within 2 s on the 2 CPU cores. Results:
fundus_hemorrhage_perf/results/<output>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from fundus_hemorrhage import client as service
from fundus_hemorrhage import registration
from fundus_hemorrhage.files import write_atomically
from fundus_hemorrhage.progression_client import compare
from fundus_hemorrhage_ops.local_server import start_triton
from fundus_hemorrhage_perf.common import load_photos, machine_info, relative
from fundus_hemorrhage_perf.synthetic_pairs import Capture, WarpSpec, capture, make_transform, warp_to_follow_up

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 2.0


def second_visit(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    h, w = image.shape[:2]
    spec = WarpSpec("homography", float(rng.uniform(-6, 6)), float(rng.uniform(0.95, 1.05)),
                    tuple(float(v) for v in rng.uniform(-200, 200, 2)))
    return capture(warp_to_follow_up(image, make_transform(spec, (w, h), (w, h)), (w, h)),
                   Capture((1.0, 1.05, 0.95), 1.1, (0.1, 0.0), 0.8, 1.5, 92), rng)


def stats(seconds: list[float]) -> dict:
    s = np.asarray(seconds)
    return {"n": len(s), "median_s": float(np.median(s)), "p90_s": float(np.percentile(s, 90)),
            "max_s": float(s.max()), "mean_s": float(s.mean())}


def run(url: str, pairs: list[tuple[bytes, bytes]], requests: int, warmup: int) -> dict:
    client = service.make_client(url, "grpc")
    for i in range(warmup):
        compare(client, "grpc", [pairs[i % len(pairs)]], timeout=120)
    progression, ensemble, statuses = [], [], []
    for i in range(requests):
        pair = pairs[i % len(pairs)]
        start = time.perf_counter()
        (answer,) = compare(client, "grpc", [pair], timeout=120)
        progression.append(time.perf_counter() - start)
        statuses.append(answer.change_report.get("registration", {}).get("status"))
        start = time.perf_counter()
        results = service.segment(client, "grpc", list(pair), timeout=120)
        ensemble.append(time.perf_counter() - start)
        if not all(r.ok for r in results):
            raise RuntimeError(f"ensemble failed: {[r.error for r in results]}")
    local = []
    for pair in pairs:
        start = time.perf_counter()
        registration.register(*pair)
        local.append(time.perf_counter() - start)
    return {"progression_request": stats(progression), "ensemble_same_two_photos": stats(ensemble),
            "registration_in_process_single_thread": stats(local),
            "registration_status": {s: statuses.count(s) for s in set(statuses)}}


def markdown(result: dict) -> str:
    p, e, r = (result["timings"][k] for k in ("progression_request", "ensemble_same_two_photos",
                                                "registration_in_process_single_thread"))
    verdict = "within" if p["median_s"] <= TARGET_S else "NOT within"
    return "\n".join([
        "# Progression: latency of a 2-photo comparison through Triton", "",
        f"Command: `{result['command']}`; photos `{result['photos']}` ({result['photo_count']}), "
        f"{result['requests']} sequential requests after {result['warmup']} warm-up; machine {result['machine']}.", "",
        "| what | n | median s | p90 s | max s |", "|---|---|---|---|---|",
        f"| hemorrhage_progression, 1 pair (2 photos) | {p['n']} | {p['median_s']:.3f} | {p['p90_s']:.3f} | {p['max_s']:.3f} |",
        f"| hemorrhage_segmentation, the same 2 photos | {e['n']} | {e['median_s']:.3f} | {e['p90_s']:.3f} | {e['max_s']:.3f} |",
        f"| registration alone, in process (both photos' keypoints + fit) | {r['n']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | {r['max_s']:.3f} |",
        "", f"Median comparison {p['median_s']:.2f} s: {verdict} the {TARGET_S:.0f} s target. Registration statuses: "
        f"{result['timings']['registration_status']}.", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gRPC address of a running serve.py (default: start one)")
    parser.add_argument("--photos", type=Path, help="folder of photos (default: samples/)")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default="progression-bench")
    args = parser.parse_args(argv)
    photos = load_photos(args.photos)
    pairs = [(data, second_visit(data, i)) for i, (_, data) in enumerate(photos)]
    with tempfile.TemporaryDirectory(prefix="progression-bench-") as tmp:
        server = None if args.url else start_triton(Path(tmp) / "triton.log")
        try:
            timings = run(args.url or server.grpc_url, pairs, args.requests, args.warmup)
        finally:
            if server is not None:
                server.stop()
    result = {"command": "python -m fundus_hemorrhage_perf.progression_bench"
                         + (f" --photos {relative(args.photos)}" if args.photos else ""),
              "photos": relative(args.photos) if args.photos else "samples", "photo_count": len(photos),
              "requests": args.requests, "warmup": args.warmup, "machine": machine_info(), "timings": timings,
              "target_s": TARGET_S}
    RESULTS.mkdir(exist_ok=True)
    write_atomically(RESULTS / f"{args.output}.json", json.dumps(result, indent=1))
    write_atomically(RESULTS / f"{args.output}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
