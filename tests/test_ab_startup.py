"""A/B start-up: serve.py --traffic comes up every time (issue 23: tritonserver 2.51 aborted with
boost::interprocess::lock_exception in 3 of 5 such starts, about 1 s after unet_router logged its split).

Cause (measured, docs/reliability.md "A/B start"): unet_router's initialize called pb_utils.is_model_ready() for the
split's versions while Triton was still starting; that call fails there ("Server not ready"), and the Python
backend's handling of the failure corrupts the instance's shared-memory pool. Without the call: 10 of 10 starts.
"""

from __future__ import annotations

import ast
import re

import pytest

from conftest import REPO_ROOT, start_server, stop_server

ROUTER_PY = REPO_ROOT / "model_repository" / "unet_router" / "1" / "model.py"
STARTS = 4  # with the bug each start crashed with p ~ 0.7 (9 of 13 measured): 4 clean starts by chance ~ 1 %


def test_the_routers_initialize_calls_nothing_in_triton():
    """No model-control or BLS call in TritonPythonModel.initialize (is_model_ready fails while Triton starts)."""
    tree = ast.parse(ROUTER_PY.read_text())
    model = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel")
    initialize = next(n for n in model.body if isinstance(n, ast.FunctionDef) and n.name == "initialize")
    called = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
              for node in ast.walk(initialize) if isinstance(node, ast.Call)}
    names = {getattr(node, "id", None) for node in ast.walk(initialize)}
    forbidden = {"is_model_ready", "unet_ready", "served_versions", "load_model", "unload_model", "exec",
                 "async_exec", "InferenceRequest"}
    assert not (called | names) & forbidden


@pytest.mark.slow
def test_serve_py_with_a_traffic_split_comes_up_every_time(tmp_path):
    for i in range(STARTS):  # fresh ports each time, serve.py in a session of its own (start_server)
        server = start_server(tmp_path / str(i), extra_args=("--traffic", "2:70,1:30"))
        try:
            log = server.log()
            assert "lock_exception" not in log
            assert re.search(r"unet_router: traffic '2:70,1:30'", log)
        finally:
            assert stop_server(server) == 0
