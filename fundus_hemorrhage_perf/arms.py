"""The bench's arms, each measured by the same closed loop: the bare model, the in-process pipeline, the Triton
ensemble and the FastAPI baseline (fundus_hemorrhage_perf/bench.py runs them one after another and writes the report)."""

from __future__ import annotations

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
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from fundus_hemorrhage import client as service
from fundus_hemorrhage import contract as c
from fundus_hemorrhage.onnx_session import create_session, run
from fundus_hemorrhage.pipeline import Model, Pipeline, with_identity
from fundus_hemorrhage.preprocessing import preprocess
from fundus_hemorrhage_ops.local_server import REPO_ROOT, free_ports, wait_http_ready
from fundus_hemorrhage_perf.common import PhotoCycle, check_outputs, relative
from fundus_hemorrhage_perf.report import summarize


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


# ----------------------------------------------------------------------------- in-process arms (ONNX Runtime)

def preprocessed_batch(photos, batch: int) -> np.ndarray:
    """PIXELS [batch, 3, S, S] of the first `batch` photos (cycled)."""
    return np.stack([preprocess(photos[i % len(photos)][1]).pixels for i in range(batch)])


def served_model(onnx_path: Path, threads: int, version: int, threshold: float | None) -> Model:
    """The unet graph on the serving session options. A graph built by build_engines carries its THRESHOLD and
    MODEL_VERSION; one without them (or a --threshold given) gets `version` and `threshold` added."""
    session = create_session(onnx_path, threads)
    if threshold is None and c.THRESHOLD in {o.name for o in session.get_outputs()}:
        return lambda pixels: run(session, pixels)
    return with_identity(lambda pixels: run(session, pixels)[c.PROBABILITY], version, threshold)


def run_onnx(args, photos, onnx_path: Path) -> dict:
    """The ceiling: the model alone on one batch of already-preprocessed photos, one caller."""
    session = create_session(onnx_path, args.ort_threads)
    pixels = preprocessed_batch(photos, args.batch)

    def make_sender(_i):
        def send():
            return pixels.shape[0], run(session, pixels)[c.PROBABILITY].nbytes
        return send

    result = summarize(closed_loop(make_sender, 1, args.warmup, args.duration, args.min_requests), 1)
    result["ort_threads"] = args.ort_threads
    return result


def pipeline_request(pipeline: Pipeline, batch: list[bytes], with_probability: bool) -> tuple[int, int]:
    """One request through the pipeline: (photos, response bytes); raises unless every photo came back ok."""
    results = pipeline(batch, with_probability)
    failed = [r.report.get("error") for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} photos failed: {failed[0]}")
    return len(results), sum(len(r.mask_png) + len(json.dumps(r.report)) + len(r.probability_png) for r in results)


def _pipeline_process(i, settings, photos, onnx_path, version, threshold, barrier, queue):
    """One worker process of the process-pool pipeline: own session, closed loop until the shared deadline."""
    try:
        threads = max(1, settings["ort_threads"] // settings["workers"])
        pipeline = Pipeline(served_model(onnx_path, threads, version, threshold), threads=1)
        cycle = PhotoCycle(photos, settings["batch"], offset=i * settings["batch"])
        pipeline_request(pipeline, cycle.next(), settings["probability"])  # load everything before the clock
    except BaseException as exc:  # noqa: BLE001
        barrier.abort()
        queue.put((i, None, repr(exc)))
        return
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        queue.put((i, None, "another worker failed to start"))
        return
    end_at = time.monotonic() + settings["warmup"] + settings["duration"]
    records = []
    while time.monotonic() < end_at:
        t0 = time.monotonic()
        try:
            photos_done, nbytes = pipeline_request(pipeline, cycle.next(), settings["probability"])
            error = None
        except Exception as exc:  # noqa: BLE001
            photos_done, nbytes, error = 0, 0, repr(exc)[:500]
        records.append(Record(t0, time.monotonic(), photos_done, nbytes, error))
    queue.put((i, [asdict(r) for r in records], None))


def run_pipeline(args, photos, onnx_path: Path, version: int) -> dict:
    """fundus_hemorrhage.pipeline in this process: --pipeline-workers threads sharing one session, each running
    whole batches end to end (OpenCV, PIL and ONNX Runtime release the GIL), or that many processes."""
    workers = args.pipeline_workers
    if args.pipeline_pool == "thread":
        model = served_model(onnx_path, args.ort_threads, version, args.threshold)

        def make_sender(i):
            pipeline = Pipeline(model, threads=1)  # one photo at a time per worker: the workers are the parallelism
            cycle = PhotoCycle(photos, args.batch, offset=i * args.batch)
            return lambda: pipeline_request(pipeline, cycle.next(), args.probability)

        result = summarize(closed_loop(make_sender, workers, args.warmup, args.duration, args.min_requests), workers)
    else:
        ctx = mp.get_context("spawn")
        barrier, queue = ctx.Barrier(workers + 1), ctx.Queue()
        settings = {"ort_threads": args.ort_threads, "workers": workers, "batch": args.batch,
                    "warmup": args.warmup, "duration": args.duration, "probability": args.probability}
        procs = [ctx.Process(target=_pipeline_process,
                             args=(i, settings, photos, onnx_path, version, args.threshold, barrier, queue))
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

def _int(value) -> int:
    return int(value) if value not in (None, "") else 0


def read_statistics(protocol: str, url: str) -> dict:
    """{model: {field: (count, ns)}, plus inference/execution counts and the batch-size histogram}."""
    client = service.make_client(url, protocol)
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


def tree_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` and all its descendants (tritonserver, its stubs, HAProxy) so
    far; None without a pid or when it is gone. What the server spent, whatever else shares the machine."""
    import psutil

    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0.0
    for process in processes:
        try:
            t = process.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:  # a stub that ended between the listing and now
            pass
    return total


def run_triton(args, photos, url: str, server_pid: int | None = None) -> list[dict]:
    """The ensemble through the client library, a level per --concurrency; the server's statistics per level,
    and with `server_pid` (serve.py's) the CPU seconds its process tree spent per photo in the window."""
    probability = True if args.probability else None

    def make_sender(i):
        client = service.make_client(url, args.protocol, timeout=600.0)
        cycle = PhotoCycle(photos, args.batch, offset=i * args.batch)
        inputs = {}  # IMAGE input per cycle position, built once: the loop measures the service, not numpy

        def send():
            key = cycle.position
            batch = cycle.next()
            if key not in inputs:
                inputs[key] = service.image_input(args.protocol, batch)
            result = service.infer(client, args.protocol, inputs[key], probability)
            return len(batch), check_outputs(result.as_numpy(c.LESIONS), result.as_numpy(c.MASK), len(batch))
        return send

    levels = []
    for concurrency in args.concurrency:
        snapshot = lambda: (read_statistics(args.protocol, url), tree_cpu_seconds(server_pid))  # noqa: E731
        loop = closed_loop(make_sender, concurrency, args.warmup, args.duration, args.min_requests, snapshot,
                           snapshot)
        level = summarize(loop, concurrency)
        (before, cpu_before), (after, cpu_after) = loop["before"], loop["after"]
        level["server"] = statistics_delta(before, after)
        served = sum(row["inferences"] for name, row in level["server"].items() if name == c.ENSEMBLE)
        level["server_cpu_ms_per_photo"] = (1e3 * (cpu_after - cpu_before) / served
                                            if cpu_before is not None and cpu_after is not None and served else None)
        levels.append(level)
        print(f"  triton  c={concurrency}: {level['photos_per_s']:.2f} photos/s, "
              f"p95 {level['latency_ms']['p95']:.0f} ms, {level['errors']} errors", flush=True)
    return levels


# ------------------------------------------------------------------------------------------------ FastAPI

def start_fastapi(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    """fundus_hemorrhage_perf/fastapi_baseline.py on a free port, serving args.checkpoint as the served version."""
    port = free_ports(1)[0]
    cmd = [sys.executable, str(REPO_ROOT / "fundus_hemorrhage_perf" / "fastapi_baseline.py"), "--checkpoint", str(args.checkpoint),
           "--model-repository", str(args.model_repository), "--port", str(port)]
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
    """Its endpoint takes one photo: a client's request is its --batch photos POSTed one after another on one
    keep-alive connection."""
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
    for concurrency in args.fastapi_concurrency or args.concurrency:
        level = summarize(closed_loop(make_sender, concurrency, args.warmup, args.duration, args.min_requests),
                          concurrency)
        levels.append(level)
        print(f"  fastapi c={concurrency}: {level['photos_per_s']:.2f} photos/s, "
              f"p95 {level['latency_ms']['p95']:.0f} ms, {level['errors']} errors", flush=True)
    return levels


def weights_check(checkpoint: Path, onnx_path: Path, photos) -> dict:
    """max |p_torch - p_onnx| on one real photo: the FastAPI arm must run the same weights as the ensemble.

    An int8 version keeps its FP32 export beside it (model_fp32.onnx): the check compares against that, since
    quantisation alone moves single probabilities by up to ~0.2 (its effect on AUPR is gated at build time).
    """
    from fundus_hemorrhage_perf.fastapi_baseline import load_model, torch_probability

    fp32 = onnx_path.with_name("model_fp32.onnx")
    onnx_path = fp32 if fp32.exists() else onnx_path
    pixels = preprocessed_batch(photos, 1)
    p_torch = torch_probability(load_model(checkpoint))(pixels)
    p_onnx = run(create_session(onnx_path, os.cpu_count() or 1), pixels)[c.PROBABILITY]
    diff = float(np.abs(p_torch - p_onnx).max())
    return {"checkpoint": relative(checkpoint), "onnx": relative(onnx_path), "max_abs_probability_diff": diff,
            "same_weights": diff < 1e-3}
