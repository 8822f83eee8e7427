"""Checks a new model version folder before Triton is asked to load it.

A folder passes when the files its config names are there (a folder still being copied has no model.onnx
yet), its ONNX file loads with fundus_hemorrhage.onnx_session.create_session (in a subprocess: a crash or a
huge allocation stays out of serve.py) and maps a zero input of the configured shape to outputs of the
configured shapes, and the identity baked into the graph (fundus_hemorrhage_ops.engines.identity) names the
folder's own version number: a folder copied to another number would report the wrong version. The preprocessing
its model.json declares (fundus_hemorrhage_ops.engines.plan; none declared: the default plan) must be what the
repository's preprocess step does, or its masks would come from pixels it was not made for.

    python -m fundus_hemorrhage_ops.serving.validation <model.onnx> <version> [<spec JSON>]   (what the subprocess runs)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.model_config import ModelConfig, parameters, read_config, tensor_dims
from .admin import LOAD_TIMEOUT

# The model file a backend loads when the config names none (Triton's defaults).
_DEFAULT_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}


def required_files(config: ModelConfig) -> list[str]:
    """Files a version folder of this model must hold, relative to the folder."""
    if config.backend == "python":
        files = [config.default_model_filename or "model.py"]
        onnx_file = parameters(config).get("onnx_file")
        return files + [onnx_file] if onnx_file else files
    name = config.default_model_filename or _DEFAULT_FILES.get(config.platform or config.backend)
    return [name] if name else []


def onnx_spec(config: ModelConfig) -> dict | None:
    """What the subprocess checks: input name, shape and NumPy dtype; output names and shapes (-1: any); whether
    the graph must carry its identity. None when an input is not numeric (nothing to feed)."""
    from tritonclient.utils import triton_to_np_dtype

    batch = [1] if config.max_batch_size > 0 else []
    inputs = {}
    for tensor in config.input:
        dtype = triton_to_np_dtype(pb.DataType.Name(tensor.data_type).removeprefix("TYPE_"))
        if dtype is None or dtype is object:
            return None
        inputs[tensor.name] = {"shape": batch + [max(1, d) for d in tensor.dims], "dtype": dtype().dtype.name}
    outputs = {tensor.name: batch + list(tensor.dims) for tensor in config.output}
    return {"inputs": inputs, "outputs": outputs, "identity": c.MODEL_VERSION in outputs}


def served_working_size(version_dir: Path, config: ModelConfig | None) -> int:
    """The working size of the repository's preprocess step (its PIXELS output), else of `config`'s PIXELS input,
    else the contract's."""
    preprocess = version_dir.parent.parent / c.PREPROCESS / "config.pbtxt"
    for cfg in ([read_config(preprocess)] if preprocess.is_file() else []) + ([config] if config else []):
        dims = tensor_dims(cfg, c.PIXELS)
        if dims:
            return int(dims[-1])
    return c.WORKING_SIZE


def preprocessing_reason(version_dir: Path, config: ModelConfig | None) -> str | None:
    """None if the preprocessing the version's model.json declares is the preprocess step's; else the reason."""
    from ..engines.plan import declared_plan, plan_difference, served_plan  # imports OpenCV: only when checking

    path = version_dir / "model.json"
    try:
        meta = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        return f"model.json cannot be read ({exc})"
    difference = plan_difference(declared_plan(meta), served_plan(served_working_size(version_dir, config)))
    return f"model.json's preprocessing is not the preprocess step's: {difference}" if difference else None


def validate_version(version_dir: Path, config: ModelConfig | None) -> str | None:
    """None if the version folder can be served with `config` (the served config; None: only check that its
    ONNX files load and carry the right identity) and the repository's preprocessing; else the reason, one line."""
    version = int(version_dir.name)
    reason = preprocessing_reason(version_dir, config)
    if reason:
        return reason
    if config is not None:
        missing = [name for name in required_files(config) if not (version_dir / name).is_file()]
        if missing:
            return f"no {', '.join(missing)} in the folder (yet: a copy still in progress?)"
        onnx_file = parameters(config).get("onnx_file") or _DEFAULT_FILES.get(config.platform)
        files = [version_dir / onnx_file] if onnx_file and onnx_file.endswith(".onnx") else []
        spec = onnx_spec(config)
    else:
        files, spec = sorted(version_dir.glob("*.onnx")), None
    for onnx in files:
        command = [sys.executable, "-m", __name__, str(onnx), str(version)] + ([json.dumps(spec)] if spec else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=LOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"{onnx.name}: ONNX Runtime did not load it within {LOAD_TIMEOUT:.0f} s"
        if done.returncode != 0:
            if "No module named 'onnxruntime'" in done.stderr:
                return None  # nothing to check with: Triton's own load decides
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return f"{onnx.name}: {lines[-1][:300] if lines else f'exit code {done.returncode}'}"
    return None


def check_onnx(path: Path, version: int, spec: dict | None) -> str | None:
    """The subprocess's check of one ONNX file; None or the reason."""
    import numpy as np

    from ..engines.identity import read_identity
    from fundus_hemorrhage.onnx_session import create_session

    session = create_session(path, threads=1)
    identity = read_identity(path)
    if identity is not None and identity[0] != version:
        return (f"its graph carries the identity of version {identity[0]} (MODEL_VERSION), not {version}: a folder "
                f"copied to another number? Write version {version} with build_engines.py")
    if spec is None:
        return None
    if spec["identity"] and identity is None:
        return f"its graph carries no identity ({c.THRESHOLD}, {c.MODEL_VERSION}): write it with build_engines.py"
    feed = {name: np.zeros(t["shape"], t["dtype"]) for name, t in spec["inputs"].items()}
    names = [o.name for o in session.get_outputs()]
    missing = sorted(set(spec["outputs"]) - set(names))
    if missing:
        return f"the graph has no output(s) {missing}; the model config expects {sorted(spec['outputs'])}"
    out = dict(zip(names, session.run(names, feed)))
    for name, expected in spec["outputs"].items():
        shape = list(out[name].shape)
        if len(shape) != len(expected) or any(e not in (-1, s) for s, e in zip(shape, expected)):
            return f"output {name} has shape {shape} for input {[t['shape'] for t in spec['inputs'].values()]}, " \
                   f"the model config expects {expected}"
        if out[name].dtype.kind == "f" and not np.all(np.isfinite(out[name])):
            return f"non-finite {name} for a zero input"
    return None


if __name__ == "__main__":
    reason = check_onnx(Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
    sys.exit(reason)
