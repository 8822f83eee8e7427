#!/usr/bin/env python3
"""Soak test: minutes of steady load on the ensemble; every request must succeed and no process may grow.

    # starts serve.py itself on free ports (10 minutes, 4 clients x 2 photos, samples/)
    .venv/bin/python fundus_hemorrhage_perf/soak.py --out fundus_hemorrhage_perf/results/soak
    # against a running server on this machine (its processes are found by the gRPC port)
    .venv/bin/python fundus_hemorrhage_perf/soak.py --url 127.0.0.1:8001 --minutes 30 --clients 8

The resident memory (RSS) of tritonserver and of each Python backend stub is sampled every --sample-every
seconds. Growth = (median of the last fifth of the samples - median of the first fifth after --warmup) / the
latter, per process and for all together. Pass: 0 failed requests and every growth under --max-growth (10 %).
The Python backend's /dev/shm regions are sampled and judged the same way (Triton users report shm growth with
BLS, server#7481; every request here goes through the router's BLS call).
Results: a markdown table and JSON on stdout, and in --out.md / --out.json. Exit code 1 when the soak does not pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

from fundus_hemorrhage_perf.common import load_photos, machine_info
from fundus_hemorrhage_ops.local_server import local_triton
from fundus_hemorrhage_perf.kill_stub import Load
from fundus_hemorrhage_perf.report import latency_summary_ms


def process_label(proc: psutil.Process, triton_pid: int) -> str:
    if proc.pid == triton_pid:
        return "tritonserver"
    cmdline = proc.cmdline()
    if len(cmdline) > 1 and cmdline[0].endswith("triton_python_backend_stub"):
        model_py = Path(cmdline[1])
        return f"{model_py.parent.parent.name}/{model_py.parent.name} stub pid {proc.pid}"
    return f"{proc.name()} pid {proc.pid}"


SHM = "/dev/shm (Python backend regions)"  # not a process: its bytes are left out of the processes' sum


def python_backend_shm_bytes() -> int:
    """Bytes held in /dev/shm by Python-backend regions (allocated blocks: the regions are sparse files). Every
    stub's region counts, whichever server it belongs to: soak on a machine where no other server runs."""
    return sum(p.stat().st_blocks * 512 for p in Path("/dev/shm").glob("triton_python_backend_shm_region_*"))


class RssSampler(threading.Thread):
    """RSS (bytes) of tritonserver and its children, and the Python backend's /dev/shm, every `interval` s."""

    def __init__(self, triton_pid: int, interval: float):
        super().__init__(daemon=True)
        self.triton_pid, self.interval = triton_pid, interval
        self.samples: list[dict] = []  # {"t": seconds since start, "rss": {label: bytes}}
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        rss = {}
        try:
            triton = psutil.Process(self.triton_pid)
            for proc in [triton, *triton.children()]:
                try:
                    rss[process_label(proc, self.triton_pid)] = proc.memory_info().rss
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        rss[SHM] = python_backend_shm_bytes()
        self.samples.append({"t": round(time.monotonic() - self.t0, 1), "rss": rss})

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def growth_table(samples: list[dict], warmup: float, max_growth: float) -> list[dict]:
    after = [s for s in samples if s["t"] >= warmup]
    if len(after) < 2:
        after = samples
    labels = sorted({label for s in after for label in s["rss"]}, key=lambda x: (x != "tritonserver", x))
    rows = []

    def row(label: str, values: list[tuple[float, int]]) -> dict:
        k = max(3, len(values) // 5)  # medians of the first and last fifths: RSS swings with each photo's size
        first = statistics.median(v for _, v in values[:k])
        last = statistics.median(v for _, v in values[-k:])
        growth = (last - first) / first * 100.0 if first else float("nan")
        return {"process": label, "samples": len(values), "first_mib": round(first / 2**20, 1),
                "last_mib": round(last / 2**20, 1), "peak_mib": round(max(v for _, v in values) / 2**20, 1),
                "growth_pct": round(growth, 2), "ok": growth < max_growth,
                "present_throughout": len(values) == len(after)}

    for label in labels:
        values = [(s["t"], s["rss"][label]) for s in after if label in s["rss"]]
        if values:
            rows.append(row(label, values))
    totals = [(s["t"], sum(v for k, v in s["rss"].items() if k != SHM)) for s in after if s["rss"]]
    if totals:
        rows.append(row("all (sum)", totals))
    return rows


def markdown(result: dict) -> str:
    r = result["requests"]
    lines = [
        f"## Soak: {result['minutes']} min, {result['clients']} clients x {result['batch']} photos "
        f"({'PASS' if result['passed'] else 'FAIL'})",
        "",
        f"requests {r['total']}, failed {r['failed']}, photos/s {r['photos_per_s']:.2f}, latency ms p50 "
        f"{r['latency_ms']['p50']:.0f} p95 {r['latency_ms']['p95']:.0f} max {r['latency_ms']['max']:.0f}",
        "",
        f"RSS growth after {result['warmup_s']:.0f} s of warm-up (limit {result['max_growth_pct']} %):",
        "",
        "| process | samples | first (MiB) | last (MiB) | peak (MiB) | growth (%) | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rss"]:
        note = "" if row["present_throughout"] else " (not in every sample: restarted?)"
        lines.append(f"| {row['process']}{note} | {row['samples']} | {row['first_mib']} | {row['last_mib']} | "
                     f"{row['peak_mib']} | {row['growth_pct']} | {'yes' if row['ok'] else 'NO'} |")
    if r["failed"]:
        lines += ["", f"first failure: {r['error_sample']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="gRPC host:port of a running server on this machine (default: start serve.py)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="photos per request")
    p.add_argument("--photos", help="folder of photos (default: the repository's samples/; "
                                    "e.g. ../shared/data/idrid_he/images)")
    p.add_argument("--photo-glob", default="*.jpg")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    p.add_argument("--max-growth", type=float, default=10.0, help="allowed RSS growth after warm-up, percent")
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)

    photos = [data for _, data in load_photos(args.photos, args.photo_glob)]
    with local_triton(args.url, "soak") as (grpc_url, triton_pid):
        sampler = RssSampler(triton_pid, args.sample_every)
        duration = args.minutes * 60.0
        print(f"soak: {args.minutes} min, {args.clients} clients x {args.batch} photos, {len(photos)} photos, "
              f"tritonserver pid {triton_pid}", flush=True)
        sampler.start()
        t0 = time.monotonic()
        with Load(grpc_url, photos, args.clients, args.batch, timeout_s=300.0) as load:
            while time.monotonic() - t0 < duration:
                time.sleep(min(30.0, max(0.1, duration - (time.monotonic() - t0))))
                done = load.since(t0)
                print(f"  {time.monotonic() - t0:6.0f} s: {len(done)} requests, "
                      f"{sum(not r.ok for r in done)} failed", flush=True)
        elapsed = time.monotonic() - t0
        sampler.stop_event.set()
        sampler.join(10)
        sampler.sample()

    records = load.records
    failures = [r for r in records if not r.ok]
    rss = growth_table(sampler.samples, args.warmup, args.max_growth)
    result = {
        "minutes": args.minutes, "clients": args.clients, "batch": args.batch, "photos": len(photos),
        "warmup_s": args.warmup, "max_growth_pct": args.max_growth, "elapsed_s": round(elapsed, 1),
        "requests": {"total": len(records), "failed": len(failures),
                     "photos_per_s": sum(r.ok for r in records) * args.batch / elapsed,
                     "latency_ms": latency_summary_ms([r.end - r.start for r in records if r.ok]),
                     "error_sample": failures[0].error if failures else ""},
        "rss": rss, "rss_samples": sampler.samples, "machine": machine_info(),
    }
    result["passed"] = not failures and bool(records) and all(row["ok"] for row in rss)
    text = markdown(result)
    print(text)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.md").write_text(text + "\n")
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
