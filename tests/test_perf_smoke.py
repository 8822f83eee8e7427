"""Smoke test of the perf tools: they run against the real server and report without errors. No timing asserted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, SAMPLES
from fundus_hemorrhage.contract import ENSEMBLE, POSTPROCESS, PREPROCESS, SEGMENTATION_MODEL

PERF = REPO_ROOT / "fundus_hemorrhage_perf"


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd[:3]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_bench_runs_all_arms(triton_server, tmp_path):
    out = tmp_path / "bench"
    run([sys.executable, str(PERF / "bench.py"), "--url", triton_server.grpc_url, "--photos", str(SAMPLES),
         "--batch", "2", "--concurrency", "1", "--duration", "2", "--warmup", "0.5", "--min-requests", "1",
         "--arms", "onnx,pipeline,triton,fastapi", "--label", "smoke", "--out", str(out)], timeout=240)
    results = json.loads(Path(f"{out}.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"onnx", "pipeline", "triton", "fastapi"}
    for level in [arms["onnx"], arms["pipeline"], *arms["triton"], *arms["fastapi"]]:
        assert level["errors"] == 0, level["error_sample"]
        assert level["requests"] >= 1
    server = arms["triton"][0]["server"]
    assert {ENSEMBLE, PREPROCESS, SEGMENTATION_MODEL, POSTPROCESS} <= set(server)
    assert server[SEGMENTATION_MODEL]["requests"] >= 1
    # The FastAPI arm runs the checkpoint the served version's model.json names (checkpoints/, in the repository).
    assert results["config"]["checkpoint"].startswith("checkpoints/")
    assert results["weights_check"]["same_weights"] is True
    assert len(results["ratios"]) >= 4
    assert "| ratio |" in Path(f"{out}.md").read_text()


def test_locust_headless_grpc_and_http(triton_server, tmp_path):
    prefix = tmp_path / "locust"
    run([sys.executable, "-m", "locust", "-f", str(PERF / "locustfile.py"), "--headless", "-u", "2", "-r", "2",
         "-t", "5s", "--stop-timeout", "60", "--only-summary", "--csv", str(prefix),
         "--host", f"http://{triton_server.http_url}", "--grpc-url", triton_server.grpc_url,
         "--photos", str(SAMPLES), "--batch", "2"], timeout=150)
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    for name in ("infer x2", "http infer x2"):  # one user of each class
        assert int(rows[name]["Request Count"]) >= 1, rows
        assert int(rows[name]["Failure Count"]) == 0, rows


def test_perf_analyzer_input_file(tmp_path):
    out = tmp_path / "pa.json"
    run([sys.executable, str(PERF / "make_pa_input.py"), "--photos", str(SAMPLES), "--out", str(out)], timeout=60)
    data = json.loads(out.read_text())["data"]
    assert len(data) == len(list(SAMPLES.glob("*.jpg")))
    import base64
    raw = base64.b64decode(data[0]["IMAGE"]["b64"])
    assert int.from_bytes(raw[:4], "little") == len(raw) - 4 and raw[4:6] == b"\xff\xd8"  # length + JPEG
    assert subprocess.run(["bash", "-n", str(PERF / "perf_analyzer.sh")]).returncode == 0


def test_stage_profile_finds_every_stage(tmp_path):
    """Every stage's function is still where the profile looks for it (a renamed step would show as 0 calls)."""
    out = tmp_path / "stages"
    run([sys.executable, str(PERF / "stage_profile.py"), "--photos", str(SAMPLES), "--batch", "2", "--repeats", "1",
         "--out", str(out)], timeout=180)
    stages = json.loads(out.with_suffix(".json").read_text())["stages"]
    missing = [s["stage"] for s in stages if s["calls_per_request"] == 0]
    assert not missing, missing
    assert all(s["ms_per_request"] > 0 for s in stages)


def test_stub_profile_samples_each_stub(triton_server, tmp_path):
    out = tmp_path / "stubs"
    run([sys.executable, str(PERF / "stub_profile.py"), "--url", triton_server.grpc_url, "--photos", str(SAMPLES),
         "--batch", "2", "--seconds", "3", "--warmup", "1", "--out", str(out)], timeout=180)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["requests"] >= 1
    for model in (PREPROCESS, SEGMENTATION_MODEL, POSTPROCESS):
        assert result["stubs"][model]["processes"] >= 1 and result["stubs"][model]["samples"] > 0, model
    names = [f["function"] for f in result["stubs"][POSTPROCESS]["functions"]]
    assert any(name.startswith("find_lesions ") for name in names), names[:10]


def test_every_perf_tool_imports():
    """A tool nobody ran for a while still imports (serving_cost.py did not, after the package restructuring)."""
    import importlib
    import pkgutil

    import fundus_hemorrhage_perf

    for module in pkgutil.iter_modules(fundus_hemorrhage_perf.__path__):
        if module.name != "locustfile":  # gevent monkey-patches on import; run by locust in its own test above
            importlib.import_module(f"fundus_hemorrhage_perf.{module.name}")
