#!/usr/bin/env python3
"""Side-by-side throughput/latency harness: Triton ensemble vs. in-process pipeline vs. bare model vs. FastAPI.

    python perf/bench.py [--url 127.0.0.1:8001 | (starts serve.py itself)] [--protocol grpc|http]
                         [--photos DIR] [--batch 10] [--concurrency 1,2,4,8] [--duration 30] [--warmup 5]
                         [--arms onnx,pipeline,triton,fastapi] [--checkpoint PT] [--label NAME] [--out PREFIX]

Arms, run one after another so that they never share the CPUs:
  onnx      the ceiling: the served model.onnx on ONNX Runtime in this process, one caller, fed the batch of
            already-preprocessed photos again and again (no decoding, no postprocessing, no transport).
  pipeline  the same preprocess -> ONNX Runtime -> postprocess functions in this process, no server:
            --pipeline-pool thread (default): --pipeline-workers threads (default: the core count), each running
            whole batches end to end, sharing one ONNX Runtime session (--ort-threads intra-op threads);
            OpenCV, PIL decoding and ONNX Runtime release the GIL, so the threads do overlap.
            --pipeline-pool process: that many processes instead, each with its own session
            (--ort-threads / workers intra-op threads each).
  triton    the ensemble, over gRPC (or HTTP), closed loop: each of C clients sends a request of --batch photos,
            waits for the answer, sends the next; for each C in --concurrency. The server's own statistics
            (per model: queue, compute input/infer/output) are read before and after each measurement window.
  fastapi   perf/fastapi_baseline.py (uvicorn subprocess, PyTorch eager, same weights via --checkpoint),
            same clients and concurrency; its endpoint takes one photo, so a client's "request" is its --batch
            photos POSTed one after another on one keep-alive connection.
Every level: --warmup seconds discarded, then a --duration window (stretched up to 3x until --min-requests
requests have completed); throughput = photos in requests completed inside the window / window length;
latency = those requests' start-to-end time (nearest-rank percentiles). A request is an error unless every
photo comes back with a mask and a `status: ok` report.

Writes PREFIX.json (everything) and PREFIX.md (tables + ratios) and prints the markdown.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from perf.common import (  # noqa: E402
    DEFAULT_GLOB, ENSEMBLE, MODEL_REPOSITORY, PhotoCycle, check_outputs, config_parameter, default_checkpoint,
    free_ports, image_tensor, latency_summary_ms, load_photos, machine_info, served_version, start_triton,
    wait_http_ready,
)

TARGETS = {
    "ensemble_over_pipeline": 0.9,
    "ensemble_over_fastapi": 2.0,
    "ensemble_photos_per_s": 10.0,
    "one_client_p95_ms": 1000.0,
}


# ---------------------------------------------------------------------------------------- closed-loop runner

@dataclass
class Record:
    start: float
    end: float
    photos: int
    nbytes: int
    error: str | None


def closed_loop(make_sender, concurrency: int, warmup: float, duration: float, min_requests: int = 0,
                on_window_start=None, on_window_end=None) -> dict:
    """`concurrency` threads, each with its own sender (make_sender(i) -> send() -> (photos, bytes)),
    sending back to back. Returns the records and the measurement window."""
    stop = threading.Event()
    records: list[list[Record]] = [[] for _ in range(concurrency)]
    setup_errors: list[BaseException] = []
    ready = threading.Barrier(concurrency + 1)

    def worker(i: int) -> None:
        try:
            send = make_sender(i)
        except BaseException as exc:  # noqa: BLE001
            setup_errors.append(exc)
            ready.wait()
            return
        ready.wait()
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                photos, nbytes = send()
                error = None
            except Exception as exc:  # noqa: BLE001 -- counted, not fatal
                photos, nbytes, error = 0, 0, f"{type(exc).__name__}: {exc}"[:500]
            records[i].append(Record(t0, time.monotonic(), photos, nbytes, error))
            if error:
                time.sleep(0.05)  # no hot loop against a dead endpoint

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"client-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    if setup_errors:
        stop.set()
        raise RuntimeError(f"client setup failed: {setup_errors[0]!r}") from setup_errors[0]
    time.sleep(warmup)
    before = on_window_start() if on_window_start else None
    t_start = time.monotonic()
    time.sleep(duration)
    deadline = t_start + 3 * duration
    while (min_requests and time.monotonic() < deadline
           and sum(r.end >= t_start for rs in records for r in list(rs)) < min_requests):
        time.sleep(0.05)
    t_end = time.monotonic()
    after = on_window_end() if on_window_end else None
    stop.set()
    for t in threads:
        t.join()
    return {"records": [r for rs in records for r in rs], "t_start": t_start, "t_end": t_end,
            "before": before, "after": after}


def summarize(run: dict, concurrency: int) -> dict:
    window = [r for r in run["records"] if run["t_start"] <= r.end <= run["t_end"]]
    ok = [r for r in window if r.error is None]
    errors = [r.error for r in window if r.error is not None]
    seconds = run["t_end"] - run["t_start"]
    photos = sum(r.photos for r in ok)
    return {
        "concurrency": concurrency,
        "window_s": round(seconds, 3),
        "requests": len(ok),
        "errors": len(errors),
        "error_sample": errors[:3],
        "photos": photos,
        "photos_per_s": photos / seconds if seconds > 0 else 0.0,
        "requests_per_s": len(ok) / seconds if seconds > 0 else 0.0,
        "response_bytes_per_request": (sum(r.nbytes for r in ok) / len(ok)) if ok else 0,
        "latency_ms": latency_summary_ms([r.end - r.start for r in ok]),
    }


# ----------------------------------------------------------------------------------- in-process arms (ORT)

def ort_session(onnx_path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def preprocessed_batch(photos, batch: int) -> np.ndarray:
    from fundus_hemorrhage.preprocessing import PreprocessConfig, preprocess

    config = PreprocessConfig()
    return np.stack([preprocess(photos[i % len(photos)][1], config).pixels for i in range(batch)])


def run_onnx(args, photos, onnx_path: Path) -> dict:
    session = ort_session(onnx_path, args.ort_threads)
    name = session.get_inputs()[0].name
    pixels = preprocessed_batch(photos, args.batch)

    def make_sender(_i):
        def send():
            out = session.run(None, {name: pixels})[0]
            return pixels.shape[0], out.nbytes
        return send

    result = summarize(closed_loop(make_sender, 1, args.warmup, args.duration, args.min_requests), 1)
    result["ort_threads"] = args.ort_threads
    return result


class Pipeline:
    """preprocess -> ONNX Runtime -> postprocess for a batch of photo bytes, as the ensemble does it."""

    def __init__(self, onnx_path: Path, threads: int, threshold: float, version: str, session=None,
                 with_probability: bool = False):
        from postprocess_backend import PostprocessConfig
        from fundus_hemorrhage.preprocessing import PreprocessConfig

        self.session = session or ort_session(onnx_path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.pre_config = PreprocessConfig()
        self.post_config = PostprocessConfig(threshold=threshold)
        self.version = version
        self.with_probability = with_probability

    def __call__(self, batch: list[bytes]) -> tuple[int, int]:
        from postprocess_backend import postprocess
        from fundus_hemorrhage.preprocessing import preprocess

        pre = [preprocess(data, self.pre_config) for data in batch]
        probability = self.session.run(None, {self.input_name: np.stack([p.pixels for p in pre])})[0]
        nbytes = 0
        for i, p in enumerate(pre):
            result = postprocess(probability[i], p.geometry, self.post_config, "unet", self.version,
                                 self.with_probability)
            result.report["image_index"] = i
            nbytes += len(result.mask_png) + len(json.dumps(result.report)) + len(result.probability_png)
        return len(pre), nbytes


def _pipeline_process(i, args_dict, photos, onnx_path, threshold, version, barrier, queue):
    """One worker process of the process-pool pipeline: own session, closed loop until the shared deadline."""
    try:
        pipe = Pipeline(onnx_path, max(1, args_dict["ort_threads"] // args_dict["workers"]), threshold, version,
                        with_probability=args_dict["probability"])
        cycle = PhotoCycle(photos, args_dict["batch"], offset=i * args_dict["batch"])
        pipe(cycle.next())  # load everything before the clock starts
    except BaseException as exc:  # noqa: BLE001
        barrier.abort()
        queue.put((i, None, repr(exc)))
        return
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        queue.put((i, None, "another worker failed to start"))
        return
    begin = time.monotonic()
    end_at = begin + args_dict["warmup"] + args_dict["duration"]
    records = []
    while time.monotonic() < end_at:
        t0 = time.monotonic()
        try:
            photos_done, nbytes = pipe(cycle.next())
            error = None
        except Exception as exc:  # noqa: BLE001
            photos_done, nbytes, error = 0, 0, repr(exc)[:500]
        records.append(Record(t0, time.monotonic(), photos_done, nbytes, error))
    queue.put((i, [asdict(r) for r in records], None))


def run_pipeline(args, photos, onnx_path: Path, threshold: float, version: str) -> dict:
    workers = args.pipeline_workers
    if args.pipeline_pool == "thread":
        session = ort_session(onnx_path, args.ort_threads)
        pipe = Pipeline(onnx_path, args.ort_threads, threshold, version, session=session,
                        with_probability=args.probability)

        def make_sender(i):
            cycle = PhotoCycle(photos, args.batch, offset=i * args.batch)
            return lambda: pipe(cycle.next())

        result = summarize(closed_loop(make_sender, workers, args.warmup, args.duration, args.min_requests), workers)
    else:
        ctx = mp.get_context("spawn")
        barrier, queue = ctx.Barrier(workers + 1), ctx.Queue()
        args_dict = {"ort_threads": args.ort_threads, "workers": workers, "batch": args.batch,
                     "warmup": args.warmup, "duration": args.duration, "probability": args.probability}
        procs = [ctx.Process(target=_pipeline_process,
                             args=(i, args_dict, photos, onnx_path, threshold, version, barrier, queue))
                 for i in range(workers)]
        for p in procs:
            p.start()
        try:
            barrier.wait(timeout=600)
        except threading.BrokenBarrierError:
            pass  # a worker failed to start: its error is in the queue
        begin = time.monotonic()
        outcomes = [queue.get(timeout=args.warmup + 4 * args.duration + 600) for _ in procs]
        for p in procs:
            p.join()
        failed = [err for _, _, err in outcomes if err]
        if failed:
            raise RuntimeError(f"pipeline worker failed: {failed[0]}")
        records = [Record(**r) for _, recs, _ in outcomes for r in recs]
        t_start = begin + args.warmup
        result = summarize({"records": records, "t_start": t_start, "t_end": t_start + args.duration}, workers)
    result.update(pool=args.pipeline_pool, workers=workers,
                  ort_threads_per_session=args.ort_threads if args.pipeline_pool == "thread"
                  else max(1, args.ort_threads // workers))
    return result


# ------------------------------------------------------------------------------------------------- Triton

def triton_client(protocol: str, url: str):
    if protocol == "grpc":
        import tritonclient.grpc as client_module
        return client_module, client_module.InferenceServerClient(url)
    import tritonclient.http as client_module
    return client_module, client_module.InferenceServerClient(url, connection_timeout=120.0, network_timeout=600.0)


def _int(value) -> int:
    return int(value) if value not in (None, "") else 0


def read_statistics(protocol: str, url: str) -> dict:
    """{model: {field: (count, ns)}, plus inference/execution counts and the batch-size histogram}."""
    _, client = triton_client(protocol, url)
    raw = client.get_inference_statistics(as_json=True) if protocol == "grpc" else client.get_inference_statistics()
    out: dict[str, dict] = {}
    for m in raw.get("model_stats", []):
        entry = out.setdefault(m["name"], {"inference_count": 0, "execution_count": 0, "batches": {}})
        entry["inference_count"] += _int(m.get("inference_count"))
        entry["execution_count"] += _int(m.get("execution_count"))
        for field, stat in m.get("inference_stats", {}).items():
            count, ns = entry.get(field, (0, 0))
            entry[field] = (count + _int(stat.get("count")), ns + _int(stat.get("ns")))
        for b in m.get("batch_stats", []):
            size = _int(b.get("batch_size"))
            entry["batches"][size] = entry["batches"].get(size, 0) + _int(b.get("compute_infer", {}).get("count"))
    return out


def statistics_delta(before: dict, after: dict) -> dict:
    """Per model over the window: requests, executions, average batch, mean ms per request of each phase."""
    delta = {}
    for name, a in after.items():
        b = before.get(name, {})

        def diff(field):
            ca, na = a.get(field, (0, 0))
            cb, nb = b.get(field, (0, 0))
            return ca - cb, na - nb

        requests, success_ns = diff("success")
        executions = a["execution_count"] - b.get("execution_count", 0)
        inferences = a["inference_count"] - b.get("inference_count", 0)
        row = {"requests": requests, "failed": diff("fail")[0], "inferences": inferences, "executions": executions,
               "avg_batch": inferences / executions if executions else 0.0,
               "request_ms": success_ns / requests / 1e6 if requests else 0.0}
        for field in ("queue", "compute_input", "compute_infer", "compute_output"):
            count, ns = diff(field)
            row[f"{field}_ms"] = ns / count / 1e6 if count else 0.0
        row["batch_histogram"] = {str(k): v - b.get("batches", {}).get(k, 0) for k, v in sorted(a["batches"].items())
                                  if v - b.get("batches", {}).get(k, 0)}
        delta[name] = row
    return delta


def run_triton(args, photos, url: str) -> list[dict]:
    parameters = {"probability": True} if args.probability else None

    def make_sender(i):
        module, client = triton_client(args.protocol, url)
        cycle = PhotoCycle(photos, args.batch, offset=i * args.batch)
        outputs = [module.InferRequestedOutput(n, **({"binary_data": True} if args.protocol == "http" else {}))
                   for n in ("MASK", "LESIONS", "PROBABILITY")]
        payloads = {}

        def send():
            key = cycle.position
            batch = cycle.next()
            if key not in payloads:
                image = module.InferInput("IMAGE", [len(batch), 1], "BYTES")
                if args.protocol == "http":
                    image.set_data_from_numpy(image_tensor(batch), binary_data=True)
                else:
                    image.set_data_from_numpy(image_tensor(batch))
                payloads[key] = image
            result = client.infer(ENSEMBLE, [payloads[key]], outputs=outputs, parameters=parameters)
            return len(batch), check_outputs(result.as_numpy("LESIONS"), result.as_numpy("MASK"), len(batch))
        return send

    levels = []
    for c in args.concurrency:
        snapshot = lambda: read_statistics(args.protocol, url)  # noqa: E731
        run = closed_loop(make_sender, c, args.warmup, args.duration, args.min_requests, snapshot, snapshot)
        level = summarize(run, c)
        level["server"] = statistics_delta(run["before"], run["after"])
        levels.append(level)
        print(f"  triton  c={c}: {level['photos_per_s']:.2f} photos/s, p95 {level['latency_ms']['p95']:.0f} ms, "
              f"{level['errors']} errors", flush=True)
    return levels


# ------------------------------------------------------------------------------------------------ FastAPI

def start_fastapi(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    cmd = [sys.executable, str(REPO_ROOT / "perf" / "fastapi_baseline.py"), "--checkpoint", str(args.checkpoint),
           "--port", str(port)]
    if args.threshold is not None:
        cmd += ["--threshold", str(args.threshold)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    if not wait_http_ready(f"{url}/health", 300, process):
        process.terminate()
        raise RuntimeError(f"FastAPI baseline did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
    return process, url


def run_fastapi(args, photos, url: str) -> list[dict]:
    parts = urlsplit(url)

    def make_sender(i):
        cycle = PhotoCycle(photos, args.batch, offset=i * args.batch)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)

        def send():
            nbytes = 0
            for data in cycle.next():
                conn.request("POST", "/segment", body=data, headers={"Content-Type": "application/octet-stream"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {body[:300]!r}")
                answer = json.loads(body)
                if answer["report"].get("status") != "ok" or not base64.b64decode(answer["mask_png_b64"]):
                    raise RuntimeError(f"bad answer: {body[:300]!r}")
                nbytes += len(body)
            return args.batch, nbytes
        return send

    levels = []
    for c in args.fastapi_concurrency or args.concurrency:
        level = summarize(closed_loop(make_sender, c, args.warmup, args.duration, args.min_requests), c)
        levels.append(level)
        print(f"  fastapi c={c}: {level['photos_per_s']:.2f} photos/s, p95 {level['latency_ms']['p95']:.0f} ms, "
              f"{level['errors']} errors", flush=True)
    return levels


def weights_check(checkpoint: Path, onnx_path: Path, photos) -> dict:
    """max |p_torch - p_onnx| on one real photo: the FastAPI arm must run the same weights as the ensemble.

    An int8 version keeps its FP32 export beside it (model_fp32.onnx): the check compares against that, since
    quantisation alone moves single probabilities by up to ~0.2 (its effect on AUPR is gated at build time).
    """
    import torch

    fp32 = onnx_path.with_name("model_fp32.onnx")
    onnx_path = fp32 if fp32.exists() else onnx_path

    from perf.fastapi_baseline import load_model

    pixels = preprocessed_batch(photos, 1)
    model, _ = load_model(checkpoint)
    with torch.inference_mode():
        p_torch = model(torch.from_numpy(pixels)).numpy()
    session = ort_session(onnx_path, max(1, os.cpu_count() or 1))
    p_onnx = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    diff = float(np.abs(p_torch - p_onnx).max())
    return {"checkpoint": str(checkpoint), "onnx": str(onnx_path), "max_abs_probability_diff": diff,
            "same_weights": diff < 1e-3}


# ------------------------------------------------------------------------------------------------ report

def best(levels: list[dict] | None) -> dict | None:
    levels = [lv for lv in (levels or []) if lv["requests"]]
    return max(levels, key=lambda lv: lv["photos_per_s"]) if levels else None


def ratios(results: dict) -> list[dict]:
    arms = results["arms"]
    triton_best, fastapi_best = best(arms.get("triton")), best(arms.get("fastapi"))
    pipeline, onnx = arms.get("pipeline"), arms.get("onnx")
    one_client = next((lv for lv in arms.get("triton") or [] if lv["concurrency"] == 1 and lv["requests"]), None)
    batch = results["config"]["batch"]

    def row(name, value, target, higher_is_better=True, note=""):
        ok = None if value is None or target is None else (value >= target if higher_is_better else value < target)
        return {"name": name, "value": value, "target": target, "ok": ok, "note": note}

    def div(a, b):
        return a / b if a is not None and b else None

    t = triton_best["photos_per_s"] if triton_best else None
    return [
        row("ensemble / in-process pipeline (photos/s)", div(t, pipeline and pipeline["photos_per_s"]),
            TARGETS["ensemble_over_pipeline"], note="best ensemble level vs. the pipeline"),
        row("ensemble / FastAPI (photos/s)", div(t, fastapi_best and fastapi_best["photos_per_s"]),
            TARGETS["ensemble_over_fastapi"], note="best level of each"),
        row("ensemble photos/s", t, TARGETS["ensemble_photos_per_s"],
            note=f"best level (c={triton_best['concurrency']})" if triton_best else ""),
        row(f"one client's {batch}-photo request p95 (ms)", one_client["latency_ms"]["p95"] if one_client else None,
            TARGETS["one_client_p95_ms"] if batch == 10 else None, higher_is_better=False,
            note="ensemble, concurrency 1" + ("" if batch == 10 else "; target is for 10 photos")),
        row("ensemble / bare model ceiling (photos/s)", div(t, onnx and onnx["photos_per_s"]), None,
            note="information: what the serving path keeps of the model's own throughput"),
        row("in-process pipeline / bare model (photos/s)",
            div(pipeline and pipeline["photos_per_s"], onnx and onnx["photos_per_s"]), None,
            note="information: the cost of pre/postprocessing"),
    ]


def fmt(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(results: dict) -> str:
    cfg, arms = results["config"], results["arms"]
    lines = [f"# bench: {cfg['label']}", "",
             f"{results['started']} · git {results['git']} · {results['machine'].get('cpu_count')} CPUs · "
             f"load avg at start {fmt((results['machine'].get('loadavg_1m_5m_15m') or [None])[0], 2)} · "
             f"{cfg['photos']} photos from {cfg['photos_dir']} · batch {cfg['batch']} · "
             f"warm-up {cfg['warmup']} s · window {cfg['duration']} s · ensemble over {cfg['protocol']}", "",
             "| arm | clients | photos/s | requests/s | p50 ms | p95 ms | p99 ms | requests | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def table_row(arm, lv):
        lat = lv["latency_ms"]
        return (f"| {arm} | {lv['concurrency']} | {fmt(lv['photos_per_s'], 2)} | {fmt(lv['requests_per_s'], 2)} | "
                f"{fmt(lat['p50'], 0)} | {fmt(lat['p95'], 0)} | {fmt(lat['p99'], 0)} | {lv['requests']} | "
                f"{lv['errors']} |")

    if arms.get("onnx"):
        lines.append(table_row(f"bare model, ONNX Runtime ({arms['onnx']['ort_threads']} threads)", arms["onnx"]))
    if arms.get("pipeline"):
        p = arms["pipeline"]
        lines.append(table_row(f"in-process pipeline ({p['pool']} pool, {p['workers']} workers)", p))
    for lv in arms.get("triton") or []:
        lines.append(table_row("Triton ensemble", lv))
    for lv in arms.get("fastapi") or []:
        lines.append(table_row("FastAPI + PyTorch eager", lv))

    if arms.get("triton"):
        lines += ["", "Server-side, per request, mean over the window (Triton statistics API):", "",
                  "| clients | model | requests | executions | avg batch | queue ms | compute input ms | "
                  "compute infer ms | compute output ms | request ms |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for lv in arms["triton"]:
            for name in sorted(lv.get("server", {}), key=lambda n: (n != ENSEMBLE, n)):
                s = lv["server"][name]
                lines.append(f"| {lv['concurrency']} | {name} | {s['requests']} | {s['executions']} | "
                             f"{fmt(s['avg_batch'], 2)} | {fmt(s['queue_ms'])} | {fmt(s['compute_input_ms'])} | "
                             f"{fmt(s['compute_infer_ms'])} | {fmt(s['compute_output_ms'])} | "
                             f"{fmt(s['request_ms'])} |")

    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for r in results["ratios"]:
        target = "-" if r["target"] is None else (("< " if "p95" in r["name"] else ">= ") + fmt(float(r["target"]), 1))
        met = {True: "yes", False: "**no**", None: "-"}[r["ok"]]
        lines.append(f"| {r['name']} | {fmt(r['value'], 2)} | {target} | {met} |")
    if results.get("weights_check"):
        w = results["weights_check"]
        lines += ["", f"FastAPI weights: {w['checkpoint']} vs {w['onnx']}: max |Δp| = {w['max_abs_probability_diff']:.2e}"
                      f" ({'same weights' if w['same_weights'] else '**DIFFERENT WEIGHTS**'})"]
    errors = [e for arm in ("triton", "fastapi") for lv in arms.get(arm) or [] for e in lv["error_sample"]]
    errors += [e for arm in ("onnx", "pipeline") if arms.get(arm) for e in arms[arm]["error_sample"]]
    if errors:
        lines += ["", "Errors (sample): " + " | ".join(errors[:3])]
    for arm, error in results.get("arm_errors", {}).items():
        lines += ["", f"**{arm} arm failed**: {error.splitlines()[0][:500]}"]
    return "\n".join(lines) + "\n"


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
                        "unet/<version>/model.onnx (+ model.json threshold) from it")
    p.add_argument("--photos", type=Path, default=None,
                   help="photos folder (default: /work/shared/data/idrid_he/images, else samples/)")
    p.add_argument("--photo-glob", default=DEFAULT_GLOB)
    p.add_argument("--batch", type=int, default=10, help="photos per request (1..16)")
    p.add_argument("--concurrency", default="1,2,4,8", help="client counts to sweep, comma-separated")
    p.add_argument("--fastapi-concurrency", default=None, help="for the FastAPI arm (default: --concurrency)")
    p.add_argument("--duration", type=float, default=30.0, help="measurement window per level, seconds")
    p.add_argument("--warmup", type=float, default=5.0, help="discarded seconds before each window")
    p.add_argument("--min-requests", type=int, default=5,
                   help="stretch a window (up to 3x --duration) until this many requests completed in it")
    p.add_argument("--arms", default="onnx,pipeline,triton,fastapi", help="which arms to run, comma-separated")
    p.add_argument("--ort-threads", type=int, default=cpus,
                   help="ONNX Runtime intra-op threads for the bare-model arm and the pipeline's session(s) "
                        f"(default: the core count, {cpus})")
    p.add_argument("--pipeline-pool", choices=("thread", "process"), default="thread")
    p.add_argument("--pipeline-workers", type=int, default=cpus, help=f"default: the core count, {cpus}")
    p.add_argument("--onnx", type=Path, default=None, help="default: newest unet/<version>/model.onnx")
    p.add_argument("--threshold", type=float, default=None,
                   help="pipeline/FastAPI threshold (default: that version's model.json)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="FastAPI arm weights (default: runs/supervised/last.pt, else /tmp/run_smoke/last.pt)")
    p.add_argument("--fastapi-url", default=None, help="use a running fastapi_baseline.py instead of starting one")
    p.add_argument("--no-weights-check", action="store_true",
                   help="skip comparing the checkpoint's output to the ONNX model's")
    p.add_argument("--probability", action="store_true",
                   help="ensemble requests ask for the PROBABILITY PNG (the pipeline arm makes it too)")
    p.add_argument("--label", default="bench", help="name of this run in the report (e.g. the tuning change)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results" / "bench",
                   help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    if args.fastapi_concurrency:
        args.fastapi_concurrency = [int(c) for c in args.fastapi_concurrency.split(",") if c.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - {"onnx", "pipeline", "triton", "fastapi"}
    if unknown:
        p.error(f"unknown arms: {sorted(unknown)}")
    if not 1 <= args.batch <= 16:
        p.error("--batch must be within 1..16 (the ensemble's max_batch_size)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    photos = load_photos(args.photos, args.photo_glob)
    version_dir, meta = served_version(args.model_repository)
    onnx_path = args.onnx or version_dir / "model.onnx"
    threshold = args.threshold if args.threshold is not None else float(meta.get("threshold", 0.5))
    args.checkpoint = args.checkpoint or default_checkpoint()
    unet_config = args.model_repository / "unet" / "config.pbtxt"
    results = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": git_describe(),
        "machine": machine_info(),
        "config": {"label": args.label, "batch": args.batch, "concurrency": args.concurrency,
                   "duration": args.duration, "warmup": args.warmup, "min_requests": args.min_requests,
                   "protocol": args.protocol, "photos_dir": str(args.photos or "default"), "photos": len(photos),
                   "photo_mb_mean": round(sum(len(b) for _, b in photos) / len(photos) / 2**20, 2),
                   "arms": args.arms, "onnx": str(onnx_path), "threshold": threshold,
                   "checkpoint": str(args.checkpoint), "url": args.url,
                   "server_unet_intra_op_threads": config_parameter(unet_config, "intra_op_threads")
                   if unet_config.exists() else None},
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
        results["arms"]["pipeline"] = run_pipeline(args, photos, onnx_path, threshold, version_dir.name)
        print(f"  pipeline: {results['arms']['pipeline']['photos_per_s']:.2f} photos/s", flush=True)

    def arm_triton():
        server, url = None, args.url
        if url is None:
            print("  starting Triton (serve.py) ...", flush=True)
            server = start_triton(logs / f"{args.out.name}.triton.log", args.model_repository)
            url = server.grpc_url if args.protocol == "grpc" else server.http_url
        try:
            results["arms"]["triton"] = run_triton(args, photos, url)
        finally:
            if server is not None:
                server.stop()

    def arm_fastapi():
        if not args.checkpoint.exists():
            raise FileNotFoundError(f"checkpoint {args.checkpoint} (give one with --checkpoint)")
        if not args.no_weights_check:
            results["weights_check"] = weights_check(args.checkpoint, onnx_path, photos)
            if not results["weights_check"]["same_weights"]:
                print(f"  WARNING: {args.checkpoint} and {onnx_path} disagree "
                      f"(max |dp| {results['weights_check']['max_abs_probability_diff']:.3g}): "
                      "the FastAPI arm is not running the served weights", flush=True)
        process, url = None, args.fastapi_url
        if url is None:
            process, url = start_fastapi(args, logs / f"{args.out.name}.fastapi.log")
        try:
            results["arms"]["fastapi"] = run_fastapi(args, photos, url)
        finally:
            if process is not None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    arm_functions = {"onnx": arm_onnx, "pipeline": arm_pipeline, "triton": arm_triton, "fastapi": arm_fastapi}
    for arm in ("onnx", "pipeline", "triton", "fastapi"):  # fixed order; an arm that fails does not stop the rest
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
