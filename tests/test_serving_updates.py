"""The repository-update planner (fundus_hemorrhage_ops.serving.updates) and the version-folder checks
(fundus_hemorrhage_ops.serving.validation), without a server: from the old and new state of a model's folder to the
actions serve.py takes. Through a real server: tests/test_reliability.py::test_model_updates_*."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from fundus_hemorrhage import contract as c
from fundus_hemorrhage_ops.engines.identity import read_identity, write_with_identity
from fundus_hemorrhage.model_config import read_config, unet_config, write_config
from fundus_hemorrhage_ops.serving.updates import (Fingerprint, Keep, Load, Refuse, fingerprint, plan_update,
                                               select_versions, version_policy, versions_to_validate)
from fundus_hemorrhage_ops.serving.validation import validate_version
from tests.conftest import REPO_ROOT

MODEL = c.SEGMENTATION_MODEL
SERVED = {"name": MODEL, "backend": "python", "max_batch_size": c.MAX_BATCH_SIZE}  # Triton's JSON, abridged


def files(tag: str) -> tuple:
    return (("model.onnx", len(tag), hash(tag) & 0xFFFF), ("model.py", 186, 1))


def state(config: str = "c1", **versions: str) -> Fingerprint:
    """A folder's fingerprint: config.pbtxt's tag and v<N>=<files tag> per version folder."""
    return Fingerprint((len(config), hash(config) & 0xFFFF), {int(k[1:]): files(tag) for k, tag in versions.items()})


def latest(n: int = 1) -> pb.ModelVersionPolicy:
    return pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=n))


def specific(*versions: int) -> pb.ModelVersionPolicy:
    return pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=versions))


ALL = pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())


def plan(old, new, policy=None, serving=(1,), served=SERVED, refused=None, validation=None):
    return plan_update(MODEL, old, new, latest() if policy is None else policy, list(serving), served,
                       refused or {}, validation or {})


def pinned(versions) -> dict:
    return dict(SERVED, version_policy={"specific": {"versions": list(versions)}})


# ------------------------------------------------------------------------------------------- version policy

def test_select_versions_follows_triton_policies():
    assert select_versions(latest(), [1, 4, 2]) == [4]
    assert select_versions(latest(2), [1, 4, 2]) == [2, 4]
    assert select_versions(latest(5), [3, 1]) == [1, 3]
    assert select_versions(pb.ModelVersionPolicy(), [1, 4, 2]) == [4]  # none given: Triton's default, latest 1
    assert select_versions(specific(1, 3), [1, 2]) == [1]
    assert select_versions(ALL, [3, 1, 2]) == [1, 2, 3]
    assert select_versions(latest(), []) == []


def test_version_policy_is_read_from_config_pbtxt_with_protobuf(tmp_path):
    model = tmp_path / MODEL
    model.mkdir()
    assert version_policy(model) == pb.ModelVersionPolicy()  # no config.pbtxt: Triton's default
    config = unet_config()
    config.version_policy.CopyFrom(specific(1, 3))
    write_config(model, config)
    assert list(version_policy(model).specific.versions) == [1, 3]
    (model / "config.pbtxt").write_text("version_policy: { all { } }  # comment\nname: 'unet'")
    assert version_policy(model).WhichOneof("policy_choice") == "all"
    (model / "config.pbtxt").write_text("version_policy: { latest { num_versions: 2 } ")  # half written
    assert version_policy(model) == pb.ModelVersionPolicy()
    assert version_policy(REPO_ROOT / "model_repository" / MODEL).latest.num_versions == 1


def test_fingerprint_sees_version_folders_and_files_but_not_pycache(tmp_path):
    model = tmp_path / "m"
    (model / "1" / "__pycache__").mkdir(parents=True)
    (model / "config.pbtxt").write_text("name: 'm'")
    (model / "1" / "model.py").write_text("x = 1")
    before = fingerprint(model)
    (model / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"cache")  # Python's own writes: ignored
    assert fingerprint(model) == before
    (model / "2").mkdir()
    assert fingerprint(model) != before and set(fingerprint(model).versions) == {1, 2}
    (model / "1" / "model.py").write_text("x = 22")
    assert fingerprint(model).versions[1] != before.versions[1]


# ---------------------------------------------------------------------------------------------------- planner

def test_a_new_valid_version_is_loaded_from_the_repository():
    old, new = state(v1="a"), state(v1="a", v2="b")
    assert versions_to_validate(old, new, {}) == [2]
    assert plan(old, new, validation={2: None}) == [Load(MODEL, (2,))]


def test_a_refused_version_keeps_the_old_one_serving():
    old, new = state(v1="a"), state(v1="a", v2="bad")
    actions = plan(old, new, validation={2: "model.onnx: not an ONNX model"})
    assert actions[0] == Refuse(MODEL, 2, "model.onnx: not an ONNX model")
    assert actions[1:] == [Keep(MODEL, "still serving version(s) 1")]


def test_a_version_refused_before_stays_refused_until_its_files_change():
    old, new = state(v1="a", v2="bad"), state("c2", v1="a", v2="bad")  # then config.pbtxt changes
    assert versions_to_validate(old, new, {2: new.versions[2]}) == []
    actions = plan(old, new, refused={2: "bad"})
    assert actions == [Load(MODEL, (1,), pinned([1]), "config.pbtxt changed too; it applies once the refused "
                                                      "version is fixed or removed")]
    fixed = state("c2", v1="a", v2="good")
    assert versions_to_validate(new, fixed, {2: new.versions[2]}) == [2]
    assert plan(new, fixed, validation={2: None}) == [Load(MODEL, (2,))]  # refused dropped: files changed


def test_a_changed_config_reloads_from_the_repository():
    assert plan(state("c1", v1="a"), state("c2", v1="a")) == [Load(MODEL, (1,))]


def test_changed_files_of_the_served_version_are_loaded_even_beside_a_refused_one():
    old, new = state(v1="a", v3="bad"), state(v1="a2", v3="bad")
    assert versions_to_validate(old, new, {3: old.versions[3]}) == [1]
    assert plan(old, new, refused={3: "bad"}, validation={1: None}) == [Load(MODEL, (1,), pinned([1]))]


@pytest.mark.parametrize("policy, serving, target", [
    (latest(2), (2, 3), (1, 2)),   # the newest two valid ones
    (ALL, (1, 2), (1, 2)),         # every valid one: unchanged, so keep
    (specific(2, 3), (2,), (2,)),  # the listed valid ones
])
def test_version_policies_serve_the_valid_versions_they_pick(policy, serving, target):
    old, new = state(v1="a", v2="b"), state(v1="a", v2="b", v3="bad")
    actions = plan(old, new, policy, serving, validation={3: "bad"})
    assert actions[0] == Refuse(MODEL, 3, "bad")
    if tuple(serving) == target:
        assert actions[1:] == [Keep(MODEL, f"still serving version(s) {', '.join(map(str, serving))}")]
    else:
        assert actions[1:] == [Load(MODEL, target, pinned(target))]


def test_a_bad_version_outside_the_policy_does_not_block_a_load():
    old, new = state(v1="a"), state(v1="a", v2="bad", v3="c")
    actions = plan(old, new, specific(1, 3), validation={2: "bad", 3: None})
    assert actions == [Refuse(MODEL, 2, "bad"), Load(MODEL, (1, 3))]


def test_nothing_to_load_keeps_serving():
    assert plan(state(v1="a"), state()) == [Keep(MODEL, "no version folder to load; still serving version(s) 1")]
    assert plan(state(v1="a"), state(v1="a", v2="b"), specific(7)) == [
        Keep(MODEL, "no version folder to load; still serving version(s) 1")]
    # A new model whose only version is bad: not loaded, nothing served.
    actions = plan(None, state(v1="bad"), serving=(), served=None, validation={1: "bad"})
    assert actions == [Refuse(MODEL, 1, "bad"), Keep(MODEL, "no valid version to load; still serving version(s) none")]


def test_a_new_model_is_validated_whole_and_loaded():
    new = state(v1="a", v2="b")
    assert versions_to_validate(None, new, {}) == [1, 2]
    assert plan(None, new, serving=(), served=None, validation={1: None, 2: None}) == [Load(MODEL, (2,))]


# ------------------------------------------------------------------------------------- version-folder checks

@pytest.fixture
def unet_copy(tmp_path) -> Path:
    """The repository's unet config and its version 1 folder, in a scratch model folder."""
    model = tmp_path / MODEL
    model.mkdir()
    shutil.copy(REPO_ROOT / "model_repository" / MODEL / "config.pbtxt", model)
    shutil.copytree(REPO_ROOT / "model_repository" / MODEL / "1", model / "1",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return model


def test_half_copied_folder_is_not_loaded(unet_copy):
    """A version folder copied in slowly: model.py there, model.onnx not yet."""
    (unet_copy / "2").mkdir()
    shutil.copy(unet_copy / "1" / "model.py", unet_copy / "2")
    config = read_config(unet_copy)
    reason = validate_version(unet_copy / "2", config)
    assert reason is not None and "model.onnx" in reason
    actions = plan(state(v1="a"), state(v1="a", v2="partial"), validation={2: reason})
    assert actions == [Refuse(MODEL, 2, reason), Keep(MODEL, "still serving version(s) 1")]


def test_a_folder_copied_to_another_number_is_refused_and_a_rebuilt_one_passes(unet_copy):
    config = read_config(unet_copy)
    version, threshold = read_identity(unet_copy / "1" / "model.onnx")
    assert validate_version(unet_copy / "1", config) is None
    shutil.copytree(unet_copy / "1", unet_copy / "5")
    reason = validate_version(unet_copy / "5", config)
    assert reason is not None and f"identity of version {version}" in reason and "not 5" in reason, reason
    write_with_identity(unet_copy / "5" / "model.onnx", unet_copy / "5" / "model.onnx", 5, threshold)
    assert validate_version(unet_copy / "5", config) is None


def test_garbage_and_wrong_output_shapes_are_refused(unet_copy):
    import onnx
    from onnx import TensorProto, helper

    from fundus_hemorrhage_ops.engines.identity import add_identity
    config = read_config(unet_copy)
    onnx_path = unet_copy / "1" / "model.onnx"
    onnx_path.write_bytes(b"not an onnx model" * 64)
    reason = validate_version(unet_copy / "1", config)
    assert reason is not None and reason.startswith("model.onnx: "), reason
    # Three channels of probability instead of one, with the right identity.
    x = helper.make_tensor_value_info(c.PIXELS, TensorProto.FLOAT, ["N", 3, c.WORKING_SIZE, c.WORKING_SIZE])
    y = helper.make_tensor_value_info(c.PROBABILITY, TensorProto.FLOAT, ["N", 3, c.WORKING_SIZE, c.WORKING_SIZE])
    graph = helper.make_graph([helper.make_node("Sigmoid", [c.PIXELS], [c.PROBABILITY])], "wrong", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(add_identity(model, 1, 0.5), str(onnx_path))
    reason = validate_version(unet_copy / "1", config)
    assert reason is not None and f"output {c.PROBABILITY} has shape [1, 3, " in reason, reason
    onnx.save(model, str(onnx_path))  # no identity at all
    reason = validate_version(unet_copy / "1", config)
    assert reason is not None and "carries no identity" in reason, reason
