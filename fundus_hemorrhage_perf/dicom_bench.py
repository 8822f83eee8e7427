#!/usr/bin/env python3
"""DICOM gateway figures (issue 21, item 6): the time from the C-STORE of a 2-photo study to its results stored,
over N studies one after another, and the throughput of a burst of M studies sent at once, with nothing lost.

    python -m fundus_hemorrhage_perf.dicom_bench [--studies 20] [--burst 50] [--stable-age 2] [--triton URL]
        [--out fundus_hemorrhage_perf/results/dicom-bench]

Starts a real Orthanc from deploy/orthanc/ (free ports, a temporary folder removed afterwards), the gateway as its
own process, and serve.py (or uses the Triton at --triton). Each study: 2 full-size photos (samples IDRiD_04 and
IDRiD_11 as JPEG Baseline OP, one association). Latency = from the first C-STORE to the 6th output (SEG, SR,
overlay per photo) visible in Orthanc; it includes Orthanc's stable age (--stable-age seconds without a new
instance before the study counts as complete) and the gateway's poll (0.3 s). Burst: all M studies are sent
first, back to back; throughput = M / (last output - first C-STORE). Nothing lost: every study ends with exactly
its 2 photos + 6 outputs. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fundus_hemorrhage_dicom.camera import Study, op_from_jpeg
from fundus_hemorrhage_dicom.pacs import gateway_process, start_orthanc, stop_process
from fundus_hemorrhage_dicom.send import c_store, outputs_of, study_instances, wait_for_outputs
from fundus_hemorrhage_ops.local_server import free_ports, local_triton
from fundus_hemorrhage_perf.common import REPO_ROOT, machine_info, relative

PHOTOS = ("IDRiD_04.jpg", "IDRiD_11.jpg")


def study_photos(index: int, jpegs: list[bytes]):
    study = Study(patient_id=f"BENCH-{index:03d}", accession=f"B{index:05d}")
    return study, [op_from_jpeg(j, study, "L" if k == 0 else "R", k + 1) for k, j in enumerate(jpegs)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict:
    jpegs = [(REPO_ROOT / "samples" / name).read_bytes() for name in PHOTOS]
    machine_at_start = machine_info()  # the load average says whether the 2 cores were ours
    work = Path(tempfile.mkdtemp(prefix="dicom-bench-"))
    try:
        with local_triton(args.triton, "dicom-bench") as (triton_url, _pid):
            http, dicom = free_ports(2)
            orthanc = start_orthanc(work / "orthanc", http, dicom, stable_age=args.stable_age)
            gateway = gateway_process(orthanc.url, triton_url, work / "gateway", work / "gateway.log")
            try:
                latencies = []
                for i in range(args.studies):
                    study, photos = study_photos(i, jpegs)
                    start = time.monotonic()
                    assert c_store(photos, orthanc.dicom_port) == [0, 0]
                    sent = time.monotonic()
                    wait_for_outputs(orthanc.url, study.study_uid, 6, timeout=300)
                    latencies.append({"total_s": time.monotonic() - start, "c_store_s": sent - start})
                    print(f"study {i + 1}/{args.studies}: {latencies[-1]['total_s']:.2f} s", flush=True)
                burst = [study_photos(1000 + i, jpegs) for i in range(args.burst)]
                start = time.monotonic()
                for _, photos in burst:
                    assert c_store(photos, orthanc.dicom_port) == [0, 0]
                sent = time.monotonic()
                for study, _ in burst:
                    wait_for_outputs(orthanc.url, study.study_uid, 6, timeout=1800)
                end = time.monotonic()
                time.sleep(args.stable_age + 2)  # anything stored twice would show up now
                counts = [(len(study_instances(orthanc.url, s.study_uid)), len(outputs_of(orthanc.url, s.study_uid)))
                          for s, _ in burst]
            finally:
                stop_process(gateway)
                orthanc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    totals = [lat["total_s"] for lat in latencies]
    return {
        "what": "C-STORE of a 2-photo OP study -> SEG+SR+overlay of both photos stored in Orthanc",
        "photos": [relative(REPO_ROOT / "samples" / name) for name in PHOTOS], "photo_size": "4288x2848 JPEG Baseline",
        "stable_age_s": args.stable_age, "gateway_poll_s": 0.3, "machine": machine_at_start,
        "loadavg_at_end": machine_info()["loadavg_1m_5m_15m"],
        "latency": {"studies": len(totals), "median_s": statistics.median(totals), "p90_s": percentile(totals, 0.9),
                    "min_s": min(totals), "max_s": max(totals),
                    "median_after_stable_age_s": statistics.median(totals) - args.stable_age,
                    "c_store_median_s": statistics.median(lat["c_store_s"] for lat in latencies),
                    "each_s": [round(t, 3) for t in totals]},
        "burst": {"studies": args.burst, "photos": 2 * args.burst, "send_s": sent - start, "total_s": end - start,
                  "studies_per_min": 60 * args.burst / (end - start), "photos_per_s": 2 * args.burst / (end - start),
                  "studies_complete": sum(o == 6 for _, o in counts),
                  "studies_with_more_than_6_outputs": sum(o > 6 for _, o in counts),
                  "instances_per_study": sorted(set(n for n, _ in counts))},
    }


def markdown(r: dict) -> str:
    lat, b, m = r["latency"], r["burst"], r["machine"]
    return "\n".join([
        "# DICOM gateway: C-STORE to results stored",
        "",
        f"{r['what']}. Photos: {', '.join(r['photos'])} ({r['photo_size']}). Orthanc stable age "
        f"{r['stable_age_s']} s, gateway poll {r['gateway_poll_s']} s. Machine at the start: {json.dumps(m)}; load "
        f"average at the end {r['loadavg_at_end']}.",
        "",
        "| measure | value |", "|---|---|",
        f"| studies, one after another | {lat['studies']} |",
        f"| latency median / p90 / min / max (s) | {lat['median_s']:.2f} / {lat['p90_s']:.2f} / {lat['min_s']:.2f} / "
        f"{lat['max_s']:.2f} |",
        f"| of which the stable age (s) | {r['stable_age_s']} |",
        f"| latency median after the stable age (s) | {lat['median_after_stable_age_s']:.2f} |",
        f"| C-STORE of the 2 photos, median (s) | {lat['c_store_median_s']:.2f} |",
        f"| burst: studies (photos) | {b['studies']} ({b['photos']}) |",
        f"| burst: all sent after (s) | {b['send_s']:.1f} |",
        f"| burst: all results stored after (s) | {b['total_s']:.1f} |",
        f"| burst throughput | {b['studies_per_min']:.1f} studies/min, {b['photos_per_s']:.2f} photos/s |",
        f"| burst: studies with all 6 outputs / with more than 6 | {b['studies_complete']} / "
        f"{b['studies_with_more_than_6_outputs']} |",
        f"| burst: instances per study | {b['instances_per_study']} |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--burst", type=int, default=50)
    p.add_argument("--stable-age", type=int, default=2)
    p.add_argument("--triton", help="gRPC host:port of a running service (default: start serve.py)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "fundus_hemorrhage_perf" / "results" / "dicom-bench")
    args = p.parse_args(argv)
    result = run(args)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["burst"]["studies_complete"] == args.burst and not \
        result["burst"]["studies_with_more_than_6_outputs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
