"""The live A/B state (fundus_hemorrhage_ops.serving.live, runs, traffic): serve.py serves a generated repository
made from --model-repository and the run's traffic.json, and never writes --model-repository.

The unit tests need no server; the last test starts serve.py twice on the committed repository."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.model_config import parameters, read_config
from fundus_hemorrhage.routing import TrafficError, parse_traffic
from fundus_hemorrhage_ops.serving import traffic
from fundus_hemorrhage_ops.serving.live import (LiveRepository, LiveState, RouterSplit, read_state, state_for_split,
                                                write_state)
from fundus_hemorrhage_ops.serving.runs import create_run, find_run, stale_run_dirs
from fundus_hemorrhage_ops.serving.updates import repository_state

from conftest import REPO_ROOT, start_server, stop_server

REPOSITORY = REPO_ROOT / "model_repository"


def config_hashes(repository: Path) -> dict[str, str]:
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(repository.glob("*/config.pbtxt"))}


@pytest.fixture
def live(tmp_path) -> LiveRepository:
    return LiveRepository(REPOSITORY, tmp_path / "served", tmp_path / "traffic.json")


def test_the_served_repository_links_the_source_and_generates_only_what_the_split_changes(live):
    before = config_hashes(REPOSITORY)
    live.set_state(state_for_split(parse_traffic("2:70,1:30")))
    live.sync()
    root = live.root
    assert sorted(p.name for p in root.iterdir()) == sorted(p.parent.name for p in REPOSITORY.glob("*/config.pbtxt"))
    for model in (c.ENSEMBLE, c.PREPROCESS, c.POSTPROCESS):
        assert (root / model / "config.pbtxt").resolve() == REPOSITORY / model / "config.pbtxt"
    assert (root / c.SEGMENTATION_MODEL / "2").resolve() == REPOSITORY / c.SEGMENTATION_MODEL / "2"
    unet = read_config(root / c.SEGMENTATION_MODEL)
    assert not (root / c.SEGMENTATION_MODEL / "config.pbtxt").is_symlink()
    assert list(unet.version_policy.specific.versions) == [1, 2]
    committed_unet = read_config(REPOSITORY / c.SEGMENTATION_MODEL)
    unet.ClearField("version_policy")
    committed_unet.ClearField("version_policy")
    assert unet == committed_unet  # nothing else differs
    router = parameters(read_config(root / c.ROUTER))
    assert router["traffic"] == "2:70,1:30"
    assert {k: v for k, v in router.items() if k != "traffic"} == {
        k: v for k, v in parameters(read_config(REPOSITORY / c.ROUTER)).items() if k != "traffic"}
    assert (root / c.ROUTER / "config.pbtxt").read_text().startswith("# Picks the unet version")  # header kept
    state = repository_state(root)
    live.sync()
    assert repository_state(root) == state  # a sync without a change writes nothing (no reload)
    live.set_state(LiveState())  # back to the committed default: links again
    live.sync()
    assert (root / c.SEGMENTATION_MODEL / "config.pbtxt").resolve() == REPOSITORY / c.SEGMENTATION_MODEL / "config.pbtxt"
    assert (root / c.ROUTER / "config.pbtxt").resolve() == REPOSITORY / c.ROUTER / "config.pbtxt"
    assert config_hashes(REPOSITORY) == before


def test_a_router_split_waits_until_unet_serves_every_version_it_names(live):
    live.sync()
    live.set_state(state_for_split(parse_traffic("2:50,1:50"), shadow_version=None))
    live.sync(lambda: {2})  # version 1 not READY yet: unet's policy changes, the router keeps the committed split
    assert list(read_config(live.root / c.SEGMENTATION_MODEL).version_policy.specific.versions) == [1, 2]
    assert (live.root / c.ROUTER / "config.pbtxt").is_symlink()
    live.sync(lambda: {1, 2})
    assert parameters(read_config(live.root / c.ROUTER))["traffic"] == "2:50,1:50"
    # a shadow version counts as named
    live.set_state(LiveState((1, 2), RouterSplit("2:100", 1, 0.5)))
    live.sync(lambda: {2})
    assert parameters(read_config(live.root / c.ROUTER))["traffic"] == "2:50,1:50"
    live.sync(lambda: {1, 2})
    router = parameters(read_config(live.root / c.ROUTER))
    assert (router["traffic"], router["shadow_version"], router["shadow_rate"]) == ("2:100", "1", "0.5")


def test_source_changes_reach_the_served_repository(tmp_path):
    source = tmp_path / "source"
    for model in (c.SEGMENTATION_MODEL, c.ROUTER):
        (source / model / "1").mkdir(parents=True)
        shutil.copy(REPOSITORY / model / "config.pbtxt", source / model)
    live = LiveRepository(source, tmp_path / "served", tmp_path / "traffic.json")
    live.sync()
    (source / c.SEGMENTATION_MODEL / "2").mkdir()
    (source / c.SEGMENTATION_MODEL / "2" / "model.json").write_text("{}")
    live.sync()
    assert (live.root / c.SEGMENTATION_MODEL / "2" / "model.json").read_text() == "{}"
    shutil.rmtree(source / c.SEGMENTATION_MODEL / "1")
    (source / "new_model").mkdir()
    shutil.copy(REPOSITORY / c.PREPROCESS / "config.pbtxt", source / "new_model")
    live.sync()
    assert sorted(p.name for p in (live.root / c.SEGMENTATION_MODEL).iterdir()) == ["2", "config.pbtxt"]
    assert (live.root / "new_model" / "config.pbtxt").is_symlink()
    shutil.rmtree(source / "new_model")
    live.sync()
    assert not (live.root / "new_model").exists()


def test_an_unreadable_state_keeps_the_last_one(live):
    live.set_state(state_for_split(parse_traffic("2:1")))
    live.sync()
    live.state_file.write_text("{not json")
    live.sync()
    assert parameters(read_config(live.root / c.ROUTER))["traffic"] == "2:1"


@pytest.mark.parametrize("data, words", [
    ({"unet_versions": [0]}, "version numbers"), ({"unet_versions": "2"}, "version numbers"),
    ({"unet_versions": [True]}, "version numbers"), ({"router": {"traffic": "2:x"}}, "VERSION:WEIGHT"),
    ({"router": {"traffic": "2:1", "shadow_rate": 2}}, "[0, 1]"),
    ({"router": {"traffic": "", "shadow_version": 2}}, "needs a split"), ([], "JSON object")])
def test_a_bad_state_is_refused(tmp_path, data, words):
    path = tmp_path / "traffic.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TrafficError, match=words.replace("[", r"\[").replace("]", r"\]")):
        read_state(path)


def test_state_round_trips(tmp_path):
    state = state_for_split(parse_traffic("3:70,2:30"), 4, 0.1)
    assert state == LiveState((2, 3, 4), RouterSplit("3:70,2:30", 4, 0.1))
    write_state(tmp_path / "s.json", state)
    assert read_state(tmp_path / "s.json") == state
    assert state_for_split(parse_traffic("")) == LiveState() == read_state(tmp_path / "missing.json")


def test_the_traffic_tool_needs_a_running_serve_py(tmp_path, capsys):
    assert traffic.main(["--runtime-dir", str(tmp_path), "--set", "2:1"]) == 1
    assert "no serve.py is serving" in capsys.readouterr().err
    assert traffic.main(["--runtime-dir", str(tmp_path), "--url", "http://127.0.0.1:1", "--show"]) == 1
    assert "serves http://127.0.0.1:1" in capsys.readouterr().err


def test_the_traffic_tool_refuses_a_version_without_a_folder_and_puts_back_a_state_it_cannot_apply(tmp_path, capsys):
    # A run record for this very process (alive), whose HTTP port answers nothing: no step can complete.
    run = create_run(tmp_path / "runtime", model_repository=str(REPOSITORY), http_url="http://127.0.0.1:1")
    state = state_for_split(parse_traffic("2:1"))
    write_state(run.dir / "traffic.json", state)
    assert find_run(model_repository=REPOSITORY, runtime_dir=tmp_path / "runtime").dir == run.dir
    args = ["--runtime-dir", str(tmp_path / "runtime"), "--model-repository", str(REPOSITORY)]
    assert traffic.main([*args, "--set", "4:50,2:50"]) == 1
    assert "unet/4" in capsys.readouterr().err
    assert traffic.main([*args, "--set", "2:50,1:50", "--timeout", "1"]) == 1
    assert "does not serve version(s) [1, 2]" in capsys.readouterr().err
    assert read_state(run.dir / "traffic.json") == state  # put back
    run.remove()


def test_stale_run_folders_are_found(tmp_path):
    run = create_run(tmp_path)
    dead = tmp_path / "runs" / "999999999"
    dead.mkdir()
    (dead / "run.json").write_text(json.dumps({"pid": 999999999, "start": 1}))
    assert stale_run_dirs(tmp_path) == [dead]
    run.remove()


def git_status(path: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_serve_py_traffic_leaves_the_repository_as_committed_and_the_next_start_serves_the_default(tmp_path):
    """serve.py --traffic on the committed repository: the split is served, `git status` of model_repository does
    not change (while serving, after a live change, after the stop), and a start without --traffic serves the
    committed configs again."""
    status, hashes = git_status(REPOSITORY), config_hashes(REPOSITORY)
    server = start_server(tmp_path, REPOSITORY, extra_args=("--traffic", "2:70,1:30", "--poll-interval", "1"))
    try:
        shown = traffic.show(url=server.http_url)
        assert shown["served"]["traffic"] == "2:70,1:30" and shown["state"]["unet_versions"] == [1, 2]
        assert traffic.version_ready(f"http://{server.http_url}", 1)
        assert git_status(REPOSITORY) == status and config_hashes(REPOSITORY) == hashes
        traffic.apply(parse_traffic("2:90,1:10"), url=server.http_url, timeout=120, log=lambda *a: None)
        assert traffic.show(url=server.http_url)["served"]["traffic"] == "2:90,1:10"
        assert git_status(REPOSITORY) == status and config_hashes(REPOSITORY) == hashes
        run_dir = Path(shown["run"])
    finally:
        assert stop_server(server) == 0
    assert git_status(REPOSITORY) == status and config_hashes(REPOSITORY) == hashes
    assert not run_dir.exists()  # the run's folder (live state, served repository) ends with it
    server = start_server(tmp_path, REPOSITORY)
    try:
        assert traffic.show(url=server.http_url)["served"]["traffic"] == ""
        url = f"http://{server.http_url}"
        assert traffic.version_ready(url, 2) and not traffic.version_ready(url, 1)  # committed: latest 1
    finally:
        stop_server(server)
    assert os.path.isdir(REPOSITORY) and git_status(REPOSITORY) == status
