#!/usr/bin/env python3
"""The unet_router's cost: throughput of the ensemble through the router vs the same ensemble calling unet
directly, in one server run, windows interleaved (direct, router, direct, router, ...) so that a shared machine's
load falls on both alike.

    python -m fundus_hemorrhage_perf.router_cost [--batch 10] [--clients 2] [--window 20] [--rounds 3] [--out fundus_hemorrhage_perf/results/router-cost]
    python -m fundus_hemorrhage_perf.router_cost --markdown fundus_hemorrhage_perf/results/router-cost.json   # rewrite the .md from a run's JSON

Serves a copy of the repository (in a temporary folder) with one more ensemble, `<ensemble>_direct`, whose middle
step is unet itself; the unet config, the photos and the requests are the same for both. Also records the
router's own time per request from Triton's statistics API. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.model_config import read_config, write_config
from fundus_hemorrhage_perf.common import MODEL_REPOSITORY, REPO_ROOT, image_tensor, load_photos, relative
from fundus_hemorrhage_ops.local_server import start_triton

DIRECT = f"{c.ENSEMBLE}_direct"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def repository_copy(tmp: Path) -> Path:
    """The repository with an extra ensemble DIRECT: the same steps, unet instead of the router."""
    repo = tmp / "model_repository"
    shutil.copytree(MODEL_REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__", "*_fp32.onnx"))
    config = read_config(repo / c.ENSEMBLE)
    config.name = DIRECT
    for step in config.ensemble_scheduling.step:
        if step.model_name == c.ROUTER:
            step.model_name = c.SEGMENTATION_MODEL
    (repo / DIRECT / "1").mkdir(parents=True)
    write_config(repo / DIRECT, config, ["fundus_hemorrhage_perf/router_cost.py: the ensemble without the router"])
    return repo


def server_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by serve.py's process tree: all of it, and the unet_router stubs."""
    import psutil

    total = router = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            used = times.user + times.system
            total += used
            if any(f"{c.ROUTER}/" in part for part in proc.cmdline()):
                router += used
        except psutil.Error:  # a process that just ended
            continue
    return {"total": total, "router": router}


def window(url: str, model: str, photos: list[bytes], batch: int, clients: int, seconds: float,
           pid: int | None = None) -> dict:
    """Closed loop: `clients` threads send `batch` photos per request for `seconds`; photos/s, latencies and, with
    the server's `pid`, the server's CPU seconds per photo (load-independent, unlike wall-clock throughput)."""
    latencies, errors, stop = [], [], threading.Event()
    cpu_before = server_cpu(pid) if pid else None

    def client(offset: int):
        cl = grpcclient.InferenceServerClient(url)
        k = offset
        while not stop.is_set():
            chosen = [photos[(k + i) % len(photos)] for i in range(batch)]
            k += batch
            image = grpcclient.InferInput(c.IMAGE, [batch, 1], "BYTES")
            image.set_data_from_numpy(image_tensor(chosen))
            start = time.perf_counter()
            try:
                cl.infer(model, [image], outputs=[grpcclient.InferRequestedOutput(c.LESIONS)])
                if not stop.is_set():
                    latencies.append(time.perf_counter() - start)
            except Exception as exc:  # counted, the run goes on
                errors.append(str(exc)[:200])

    threads = [threading.Thread(target=client, args=(i * 3,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    done = len(latencies) + len(errors)
    cpu = {}
    if pid:
        after = server_cpu(pid)
        cpu = {f"cpu_ms_per_photo_{k}": (after[k] - cpu_before[k]) * 1000 / max(done * batch, 1) for k in after}
    return {**cpu, "model": model, "requests": len(latencies), "photos_per_s": len(latencies) * batch / seconds,
            "p50_ms": float(np.percentile(latencies, 50) * 1000) if latencies else None,
            "p95_ms": float(np.percentile(latencies, 95) * 1000) if latencies else None, "errors": len(errors)}


def router_stats(url: str) -> dict:
    """unet_router's cumulative request count and mean compute/queue ms per request (statistics API)."""
    cl = grpcclient.InferenceServerClient(url)
    stats = cl.get_inference_statistics(c.ROUTER, as_json=True)["model_stats"][0]["inference_stats"]
    n = int(stats["success"].get("count", 0))
    ms = {k: int(stats[k].get("ns", 0)) / 1e6 / max(n, 1) for k in ("queue", "compute_input", "compute_infer",
                                                                      "compute_output")}
    return {"requests": n, **ms}


def markdown(result: dict) -> str:
    """The results page for a run's JSON."""
    direct, routed = result["summary"][DIRECT], result["summary"][c.ENSEMBLE]
    lines = [f"# unet_router cost: the ensemble with and without the router\n",
             f"{result['when']} · git {result.get('git', '?')} · {result['cpus']} CPUs (shared with other work; load "
             f"average {result['load_avg_at_start']:.1f} at start) · {result['photos_dir']} · batch {result['batch']} "
             f"photos per request · {result['clients']} clients · {result['rounds']} rounds of one "
             f"{result['window_s']:.0f} s window each, interleaved · `python -m fundus_hemorrhage_perf.router_cost`\n",
             "| window | round | ensemble | photos/s | p50 ms | p95 ms | requests | errors | server CPU ms/photo "
             "| of which unet_router |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, run in enumerate(result["runs"]):
        name = "via unet_router" if run["model"] == c.ENSEMBLE else "unet directly"
        lines.append(f"| {i + 1} | {run['round']} | {name} | {run['photos_per_s']:.2f} | {run['p50_ms']:.0f} | "
                     f"{run['p95_ms']:.0f} | {run['requests']} | {run['errors']} | "
                     f"{run.get('cpu_ms_per_photo_total', float('nan')):.0f} | "
                     f"{run.get('cpu_ms_per_photo_router', float('nan')):.1f} |")
    ms = result["router_ms_per_request"]
    lines += ["", "| | unet directly | via unet_router |", "|---|---:|---:|",
              f"| mean photos/s | {direct['photos_per_s_mean']:.2f} | {routed['photos_per_s_mean']:.2f} |",
              f"| median of the windows' p50 ms | {direct['p50_ms_median']:.0f} | {routed['p50_ms_median']:.0f} |",
              f"| server CPU ms per photo (all processes) | {direct.get('cpu_ms_per_photo_mean', float('nan')):.0f} | "
              f"{routed.get('cpu_ms_per_photo_mean', float('nan')):.0f} |",
              f"| of which the unet_router stubs | {direct.get('router_cpu_ms_per_photo_mean', float('nan')):.1f} | "
              f"{routed.get('router_cpu_ms_per_photo_mean', float('nan')):.1f} |",
              "", f"Router / direct throughput: **{result['router_over_direct']:.3f}**.", "",
              f"The router's own time per request (Triton statistics, {result['router_requests']} requests of "
              f"{result['batch']} photos): queue {ms['queue']:.1f} ms, input {ms['compute_input']:.1f} ms, "
              f"execute {ms['compute_infer']:.1f} ms (includes waiting for unet: BLS), output "
              f"{ms['compute_output']:.1f} ms."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--window", type=float, default=20.0, help="seconds per measured window")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3, help="direct+router window pairs")
    p.add_argument("--photos", type=Path, default=None, help="default: the repository's samples/")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "fundus_hemorrhage_perf" / "results" / "router-cost")
    p.add_argument("--markdown", type=Path, help="only write the .md beside this run's JSON")
    args = p.parse_args(argv)
    if args.markdown:
        args.markdown.with_suffix(".md").write_text(markdown(json.loads(args.markdown.read_text())))
        return 0
    photos = [b for _, b in load_photos(args.photos)]
    tmp = Path(tempfile.mkdtemp(prefix="router-cost-"))
    server = start_triton(tmp / "triton.log", repository_copy(tmp))
    load_before = os.getloadavg()[0]
    runs = []
    try:
        url = server.grpc_url
        for model in (DIRECT, c.ENSEMBLE):
            window(url, model, photos, args.batch, args.clients, args.warmup)
        stats_before = router_stats(url)
        for r in range(args.rounds):
            for model in (DIRECT, c.ENSEMBLE) if r % 2 == 0 else (c.ENSEMBLE, DIRECT):
                runs.append(dict(window(url, model, photos, args.batch, args.clients, args.window,
                                        server.process.pid), round=r))
                print(json.dumps(runs[-1]), flush=True)
        stats_after = router_stats(url)
    finally:
        server.stop()
    n = stats_after["requests"] - stats_before["requests"]
    router_ms = {k: (stats_after[k] * stats_after["requests"] - stats_before[k] * stats_before["requests"])
                 / max(n, 1) for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    summary = {}
    for model in (DIRECT, c.ENSEMBLE):
        rates = [r["photos_per_s"] for r in runs if r["model"] == model]
        summary[model] = {"photos_per_s_mean": statistics.mean(rates), "photos_per_s": rates,
                          "cpu_ms_per_photo_mean": statistics.mean(r["cpu_ms_per_photo_total"] for r in runs
                                                                   if r["model"] == model),
                          "router_cpu_ms_per_photo_mean": statistics.mean(r["cpu_ms_per_photo_router"] for r in runs
                                                                          if r["model"] == model),
                          "p50_ms_median": statistics.median(r["p50_ms"] for r in runs if r["model"] == model)}
    ratio = summary[c.ENSEMBLE]["photos_per_s_mean"] / summary[DIRECT]["photos_per_s_mean"]
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
              "load_avg_at_start": load_before, "batch": args.batch, "clients": args.clients,
              "window_s": args.window, "rounds": args.rounds, "photos_dir": relative(args.photos or
                                                                                    REPO_ROOT / "samples"),
              "runs": runs, "summary": summary, "router_over_direct": ratio, "router_ms_per_request": router_ms,
              "router_requests": n, "git": git_commit()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({"summary": summary, "router_over_direct": ratio, "router_ms_per_request": router_ms}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
