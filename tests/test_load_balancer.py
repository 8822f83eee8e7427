"""Two serve.py replicas behind a real HAProxy (fundus_hemorrhage_perf/haproxy/failover.py), under a bounded load: a drained
replica costs no request, a killed one at most those in flight on it, and HAProxy stops routing to it quickly.
About one minute on two cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOWN_WITHIN_S = 3.0  # health checks every 0.5 s, fall 2, plus observe layer4 on refused connections


@pytest.fixture(scope="module")
def failover(tmp_path_factory) -> dict:
    if not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    output = tmp_path_factory.mktemp("haproxy") / "failover"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "fundus_hemorrhage_perf" / "haproxy" / "failover.py"), "--settle", "5",
                             "--output", str(output)], capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return json.loads(output.with_suffix(".json").read_text())


def test_sigterm_drain_loses_no_request(failover):
    term = failover["sigterm"]
    assert term["requests_completed_during_drain"] > 0
    assert term["failed"] == 0
    assert term["replica_exit_code"] == 0
    assert term["haproxy_marked_down_after_s"] < DOWN_WITHIN_S


def test_sigkill_fails_at_most_the_requests_in_flight(failover):
    kill = failover["sigkill"]
    assert kill["failed_not_in_flight_at_kill"] == 0
    assert kill["failed"] <= kill["in_flight_at_kill"]
    assert kill["haproxy_marked_down_after_s"] < DOWN_WITHIN_S
    assert kill["served_by_killed_after_kill"] == 0
    assert kill["requests_completed_after"] > 0  # the surviving replica kept serving


def test_load_was_served_by_both_replicas(failover):
    servers = {r["server"] for r in failover["records"] if r["ok"]}
    assert servers == {"a", "b"}
    assert failover["requests"]["failed"] == failover["sigkill"]["failed"]
