"""The contract holds: the repository's configs are the ones generated from it, the ensemble's steps fit together,
every shipped unet version names itself, and the in-process pipeline returns what the real ensemble returns."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from fundus_hemorrhage import contract as c
from fundus_hemorrhage_ops.engines.identity import add_identity, read_identity, strip_identity
from fundus_hemorrhage.geometry import GEOMETRY_FIELDS, Geometry
from fundus_hemorrhage.model_config import (ModelConfig, config_text, parse_config, read_config, repository_configs,
                                            tensor_dims, unet_target)
from fundus_hemorrhage.pipeline import Pipeline
from tests.conftest import REPO_ROOT, infer, make_client

REPOSITORY = REPO_ROOT / "model_repository"
UNET_VERSIONS = sorted(int(d.name) for d in (REPOSITORY / c.SEGMENTATION_MODEL).iterdir() if d.name.isdigit())


def test_committed_configs_are_the_generated_ones():
    target = unet_target(read_config(REPOSITORY / c.SEGMENTATION_MODEL))
    for name, (generated, header) in repository_configs(target).items():
        committed = read_config(REPOSITORY / name)
        assert committed == generated, f"{name}/config.pbtxt differs: run python -m fundus_hemorrhage.model_config --write"
        assert parse_config(config_text(generated, header)) == generated  # written text reads back the same


def test_the_ensemble_steps_fit_the_models_they_call():
    configs = {name: read_config(REPOSITORY / name) for name in (c.PREPROCESS, c.ROUTER, c.POSTPROCESS)}
    ensemble = read_config(REPOSITORY / c.ENSEMBLE)
    produced = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}  # ensemble tensor -> type, dims
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert model.max_batch_size == ensemble.max_batch_size == c.MAX_BATCH_SIZE
        inputs = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        outputs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        assert set(step.input_map) == set(inputs), step.model_name
        for model_input, tensor in step.input_map.items():
            assert produced[tensor] == inputs[model_input], (step.model_name, model_input)
        for model_output, tensor in step.output_map.items():
            produced[tensor] = outputs[model_output]
    assert {t.name for t in ensemble.output} <= set(produced)


def test_geometry_layout_is_the_dataclass_order():
    g = Geometry(4288, 2848, 10.5, -3.0, 2900.0, 2144.0, 1424.0, 1450.0, 700.0, 0.0, 3600.0, 2848.0, 6.0e6, 6)
    vector = g.to_vector()
    assert vector.shape == (c.GEOMETRY_LENGTH,) == (len(GEOMETRY_FIELDS),)
    assert vector[GEOMETRY_FIELDS.index("exif_orientation")] == 6
    assert Geometry.from_vector(vector) == g
    assert tensor_dims(read_config(REPOSITORY / c.PREPROCESS), c.GEOMETRY) == [c.GEOMETRY_LENGTH]
    with pytest.raises(ValueError, match="expected"):
        Geometry.from_vector(vector[:-1])


@pytest.mark.parametrize("version", UNET_VERSIONS)
def test_each_unet_version_names_itself_and_its_threshold(version):
    folder = REPOSITORY / c.SEGMENTATION_MODEL / str(version)
    graph = onnx.load(str(folder / "model.onnx"))
    served, threshold = read_identity(graph)
    assert served == version
    assert threshold == pytest.approx(json.loads((folder / "model.json").read_text())["threshold"], abs=1e-7)
    outputs = {o.name for o in graph.graph.output}
    assert outputs == {t.name for t in read_config(folder.parent).output}


def test_identity_is_replaced_not_stacked():
    graph = onnx.load(str(REPOSITORY / c.SEGMENTATION_MODEL / str(UNET_VERSIONS[-1]) / "model.onnx"))
    again = add_identity(graph, 7, 0.25)
    assert read_identity(again) == (7, pytest.approx(0.25))
    assert [o.name for o in again.graph.output].count(c.THRESHOLD) == 1
    assert read_identity(strip_identity(again)) is None


def test_unet_config_variants_share_the_interface():
    from fundus_hemorrhage.model_config import unet_config

    cpu, gpu = unet_config("cpu"), unet_config("tensorrt")
    for field in ("name", "max_batch_size", "input", "output", "version_policy", "dynamic_batching"):
        assert getattr(cpu, field) == getattr(gpu, field), field
    assert gpu.platform == "tensorrt_plan" and cpu.backend == "python"
    with pytest.raises(ValueError):
        unet_config("tpu")
    assert isinstance(cpu, ModelConfig)


def test_pipeline_returns_what_the_ensemble_returns(triton_server, sample_bytes):
    """The in-process serving path (used by evaluation, the int8 gate and the benchmarks) is the ensemble's."""
    newest = REPOSITORY / c.SEGMENTATION_MODEL / str(UNET_VERSIONS[-1]) / "model.onnx"
    photos = [*sample_bytes, b"not a photo"]
    pipeline = Pipeline.from_onnx(newest)
    local = pipeline(photos)
    pipeline.close()
    served = infer(make_client(triton_server, "grpc"), "grpc", photos, outputs=(c.MASK, c.LESIONS))
    masks, reports = served.as_numpy(c.MASK).reshape(-1), served.as_numpy(c.LESIONS).reshape(-1)
    for i, result in enumerate(local):
        assert result.report == json.loads(reports[i]), f"photo {i}"
        assert result.mask_png == bytes(masks[i]), f"photo {i}"
    assert local[-1].report["status"] == "error" and np.all([r.ok for r in local[:-1]])
