#!/usr/bin/env python3
"""CPU profile of the ensemble's Python-backend stubs under load, by py-spy (sampling, no code change).

    python fundus_hemorrhage_perf/stub_profile.py [--url 127.0.0.1:8001 | (starts serve.py)] [--photos DIR]
                                                  [--batch 10] [--clients 1] [--seconds 20] [--out PREFIX]

`--clients` clients send `--batch`-photo requests back to back while `py-spy record` samples every stub of the
preprocess, unet_router, unet and postprocess models at once (`--rate` Hz, on-CPU samples only). Each function's
inclusive time is the share of its stub's samples whose stack holds it, turned into ms per request from the
sampling rate and the requests served; the time of OpenCV, ONNX Runtime and zlib calls lands on the Python
function that made them. The Triton core (gRPC, the ensemble, copies into shared memory) is not a Python process:
its share is the server's CPU time minus the stubs' (bench.py's server statistics).

Writes PREFIX.md (a table per stub) and PREFIX.json, and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from fundus_hemorrhage import contract as c
from fundus_hemorrhage_ops.local_server import local_triton
from fundus_hemorrhage_perf.common import load_photos, machine_info, relative
from fundus_hemorrhage_perf.kill_stub import Load, stubs_of

MODELS = (c.PREPROCESS, c.ROUTER, c.SEGMENTATION_MODEL, c.POSTPROCESS)


# Frames of the thread pools and event loops every stub runs its work in: on every stack, so they say nothing.
PLUMBING = ("threading.py", "futures/thread.py", "asyncio/", "selectors.py")


def functions(collapsed: str) -> tuple[Counter, Counter, int]:
    """Inclusive and self samples per function ("name (file)") of py-spy's raw (collapsed-stack) output, and all
    samples."""
    inclusive, own, total = Counter(), Counter(), 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = [frame.rsplit(":", 1)[0] for frame in stack.split(";")]  # no line numbers: a row per function
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    return inclusive, own, total


def short(name: str) -> str:
    """'func (/…/site-packages/pkg/mod.py' -> 'func (pkg/mod.py)'."""
    func, _, path = name.partition(" (")
    path = path.rstrip(")")
    parts = Path(path).parts
    return f"{func} ({'/'.join(parts[-2:])})" if path else func


def markdown(result: dict, top: int) -> str:
    lines = [f"# Python-backend stubs under load, py-spy ({result['clients']} client(s) x {result['batch']} photos)",
             "", f"{result['time']} · git {result['git']} · {result['machine']['cpu_count']} CPUs · photos {result['photos']} · "
             f"{result['seconds']} s at {result['rate']} Hz · {result['requests']} requests served", ""]
    for model, entry in result["stubs"].items():
        lines += [f"## {model} ({entry['processes']} stub processes, {entry['cpu_ms_per_request']:.0f} ms on-CPU "
                  f"per request)", "", "| function | ms / request | share | self ms / request |",
                  "|---|---:|---:|---:|"]
        for row in entry["functions"][:top]:
            lines.append(f"| `{row['function']}` | {row['ms_per_request']:.1f} | {row['share']:.0%} | "
                         f"{row['self_ms_per_request']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="gRPC host:port of a running server on this machine (default: start serve.py)")
    p.add_argument("--photos", type=Path, default=None, help="default: the repository's samples/")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=12, help="functions per stub in the markdown")
    p.add_argument("--out", type=Path, default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args(argv)

    photos = [data for _, data in load_photos(args.photos)]
    with local_triton(args.url, "stub-profile") as (grpc_url, triton_pid), tempfile.TemporaryDirectory() as tmp:
        pids = {model: [proc.pid for proc in stubs_of(triton_pid, model)] for model in MODELS}
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        with Load(grpc_url, photos, args.clients, args.batch, timeout_s=300.0) as load:
            time.sleep(args.warmup)
            started = time.monotonic()
            recorders = {pid: (model, subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--duration", str(int(args.seconds)),
                 "--format", "raw", "--output", f"{tmp}/{pid}.txt", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                for model, model_pids in pids.items() for pid in model_pids}
            for _, proc in recorders.values():
                proc.wait(timeout=args.seconds + 60)
            served = [r for r in load.since(0.0) if r.ok and started <= r.end <= started + args.seconds]
        requests = max(1, len(served))
        result = {"time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine_info(),
                  "photos": relative(args.photos) or "samples", "batch": args.batch, "clients": args.clients,
                  "seconds": args.seconds, "rate": args.rate, "requests": len(served),
                  "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip(), "stubs": {}}
        for model in MODELS:
            inclusive, own, total = Counter(), Counter(), 0
            for pid in pids.get(model, []):
                path = Path(f"{tmp}/{pid}.txt")
                counts, own_counts, n = functions(path.read_text()) if path.exists() else (Counter(), Counter(), 0)
                inclusive.update(counts)
                own.update(own_counts)
                total += n
            ms = lambda samples: 1e3 * samples / args.rate / requests  # noqa: E731
            result["stubs"][model] = {
                "processes": len(pids.get(model, [])), "samples": total, "cpu_ms_per_request": ms(total),
                "functions": [{"function": short(name), "ms_per_request": ms(n), "share": n / max(1, total),
                               "self_ms_per_request": ms(own[name])}
                              for name, n in inclusive.most_common()
                              if not any(part in name for part in PLUMBING)]}
    text = markdown(result, args.top)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if served else 1


if __name__ == "__main__":
    sys.exit(main())
