"""The bench's report: latency statistics of a closed-loop run, the ratios against the targets, the markdown."""

from __future__ import annotations

import math

from fundus_hemorrhage.contract import ENSEMBLE

# The targets the service is held to (fundus_hemorrhage_perf/README.md).
TARGETS = {
    "ensemble_over_pipeline": 0.9,
    "ensemble_over_fastapi": 2.0,
    "ensemble_photos_per_s": 12.0,  # with FOUR_CLIENTS clients (issue 20; the seed's 10 before)
    "one_client_p95_ms": 1000.0,  # a 10-photo request, at most
}
FOUR_CLIENTS = 4


# ---------------------------------------------------------------------------------------------- statistics

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (what perf_analyzer reports); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def latency_summary_ms(latencies_s: list[float]) -> dict:
    """count, mean, p50/p90/p95/p99 and max of latencies given in seconds, in milliseconds."""
    ms = [x * 1000.0 for x in latencies_s]
    return {
        "count": len(ms),
        "mean": (sum(ms) / len(ms)) if ms else float("nan"),
        "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
        "max": max(ms) if ms else float("nan"),
    }


def summarize(run: dict, concurrency: int) -> dict:
    """One level of a closed-loop run (arms.closed_loop): the requests that ended inside the window count.
    photos/s = photos of the successful ones / window seconds; latency = their start-to-end time."""
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


# -------------------------------------------------------------------------------------------------- ratios

def best(levels: list[dict] | None) -> dict | None:
    levels = [lv for lv in (levels or []) if lv["requests"]]
    return max(levels, key=lambda lv: lv["photos_per_s"]) if levels else None


def ratios(results: dict) -> list[dict]:
    """The comparisons the targets are stated in (TARGETS), plus two for information."""
    arms = results["arms"]
    triton_best, fastapi_best = best(arms.get("triton")), best(arms.get("fastapi"))
    pipeline, onnx = arms.get("pipeline"), arms.get("onnx")
    one_client = next((lv for lv in arms.get("triton") or [] if lv["concurrency"] == 1 and lv["requests"]), None)
    four = next((lv for lv in arms.get("triton") or [] if lv["concurrency"] == FOUR_CLIENTS and lv["requests"]), None)
    batch = results["config"]["batch"]

    def row(name, value, target, higher_is_better=True, note=""):
        ok = None if value is None or target is None else (value >= target if higher_is_better else value <= target)
        return {"name": name, "value": value, "target": target, "ok": ok, "note": note}

    def div(a, b):
        return a / b if a is not None and b else None

    t = triton_best["photos_per_s"] if triton_best else None
    return [
        row("ensemble / in-process pipeline (photos/s)", div(t, pipeline and pipeline["photos_per_s"]),
            TARGETS["ensemble_over_pipeline"], note="best ensemble level vs. the pipeline"),
        row("ensemble / FastAPI (photos/s)", div(t, fastapi_best and fastapi_best["photos_per_s"]),
            TARGETS["ensemble_over_fastapi"], note="best level of each"),
        row(f"ensemble photos/s, {FOUR_CLIENTS} clients", four and four["photos_per_s"],
            TARGETS["ensemble_photos_per_s"], note=f"concurrency {FOUR_CLIENTS}"),
        row(f"one client's {batch}-photo request p95 (ms)", one_client["latency_ms"]["p95"] if one_client else None,
            TARGETS["one_client_p95_ms"] if batch == 10 else None, higher_is_better=False,
            note="ensemble, concurrency 1" + ("" if batch == 10 else "; target is for 10 photos")),
        row(f"ensemble photos/s, {FOUR_CLIENTS} clients / bare model", div(four and four["photos_per_s"],
                                                                     onnx and onnx["photos_per_s"]), None,
            note="for another machine: its bare model times this is what its ensemble should reach"),
        row(f"one client's p95 / bare model's time for {batch} photos",
            div(one_client and one_client["latency_ms"]["p95"], onnx and 1e3 * batch / onnx["photos_per_s"]), None,
            note="for another machine, likewise"),
        row("in-process pipeline / bare model (photos/s)",
            div(pipeline and pipeline["photos_per_s"], onnx and onnx["photos_per_s"]), None,
            note="information: the cost of pre/postprocessing"),
    ]


# ------------------------------------------------------------------------------------------------ markdown

def fmt(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _level_row(arm: str, lv: dict) -> str:
    lat = lv["latency_ms"]
    return (f"| {arm} | {lv['concurrency']} | {fmt(lv['photos_per_s'], 2)} | {fmt(lv['requests_per_s'], 2)} | "
            f"{fmt(lat['p50'], 0)} | {fmt(lat['p95'], 0)} | {fmt(lat['p99'], 0)} | {lv['requests']} | "
            f"{lv['errors']} | {fmt(lv.get('server_cpu_ms_per_photo'), 1)} |")


def _server_rows(levels: list[dict]) -> list[str]:
    lines = ["", "Server-side, per request, mean over the window (Triton statistics API):", "",
             "| clients | model | requests | executions | avg batch | queue ms | compute input ms | "
             "compute infer ms | compute output ms | request ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        for name in sorted(lv.get("server", {}), key=lambda n: (n != ENSEMBLE, n)):
            s = lv["server"][name]
            lines.append(f"| {lv['concurrency']} | {name} | {s['requests']} | {s['executions']} | "
                         f"{fmt(s['avg_batch'], 2)} | {fmt(s['queue_ms'])} | {fmt(s['compute_input_ms'])} | "
                         f"{fmt(s['compute_infer_ms'])} | {fmt(s['compute_output_ms'])} | {fmt(s['request_ms'])} |")
    return lines


def markdown(results: dict) -> str:
    """PREFIX.md: the run's settings, a row per arm and level, the server's per-model times, the ratios."""
    cfg, arms = results["config"], results["arms"]
    lines = [f"# bench: {cfg['label']}", "",
             f"{results['started']} · git {results['git']} · {results['machine'].get('cpu_count')} CPUs · "
             f"load avg at start {fmt((results['machine'].get('loadavg_1m_5m_15m') or [None])[0], 2)} · "
             f"{cfg['photos']} photos from {cfg['photos_dir']} · batch {cfg['batch']} · "
             f"warm-up {cfg['warmup']} s · window {cfg['duration']} s · ensemble over {cfg['protocol']}", "",
             "| arm | clients | photos/s | requests/s | p50 ms | p95 ms | p99 ms | requests | errors | "
             "server CPU ms / photo |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if arms.get("onnx"):
        lines.append(_level_row(f"bare model, ONNX Runtime ({arms['onnx']['ort_threads']} threads)", arms["onnx"]))
    if arms.get("pipeline"):
        p = arms["pipeline"]
        lines.append(_level_row(f"in-process pipeline ({p['pool']} pool, {p['workers']} workers)", p))
    lines += [_level_row("Triton ensemble", lv) for lv in arms.get("triton") or []]
    lines += [_level_row("FastAPI + PyTorch eager", lv) for lv in arms.get("fastapi") or []]
    if arms.get("triton"):
        lines += _server_rows(arms["triton"])

    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for r in results["ratios"]:
        target = "-" if r["target"] is None else (("<= " if "p95" in r["name"] else ">= ") + fmt(float(r["target"]), 1))
        met = {True: "yes", False: "**no**", None: "-"}[r["ok"]]
        lines.append(f"| {r['name']} | {fmt(r['value'], 2)} | {target} | {met} |")
    if results.get("weights_check"):
        w = results["weights_check"]
        verdict = "same weights" if w["same_weights"] else "**DIFFERENT WEIGHTS**"
        lines += ["", f"FastAPI weights: {w['checkpoint']} vs {w['onnx']}: max |Δp| = "
                      f"{w['max_abs_probability_diff']:.2e} ({verdict})"]
    errors = [e for arm in ("triton", "fastapi") for lv in arms.get(arm) or [] for e in lv["error_sample"]]
    errors += [e for arm in ("onnx", "pipeline") if arms.get(arm) for e in arms[arm]["error_sample"]]
    if errors:
        lines += ["", "Errors (sample): " + " | ".join(errors[:3])]
    for arm, error in results.get("arm_errors", {}).items():
        lines += ["", f"**{arm} arm failed**: {error.splitlines()[0][:500]}"]
    return "\n".join(lines) + "\n"
