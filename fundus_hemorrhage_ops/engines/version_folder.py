"""The `unet` model of a model repository on disk: its versions, the checkpoint behind each, and the writing of a
new version folder.

A version folder is assembled as unet/.building-N and renamed to unet/N only once complete (model.onnx or
model.plan, model.py, model.json; an int8 one also model_fp32.onnx and calibration.json), so Triton and the
update watcher never see half a version; config.pbtxt is written (protobuf, fundus_hemorrhage.model_config) only
after the rename. Every ONNX written into the folder carries the THRESHOLD and MODEL_VERSION of version N
(identity.add_identity).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from fundus_hemorrhage import contract as c
from fundus_hemorrhage import model_config as mc
from . import BuildError
from .identity import write_with_identity

# The Triton adapter is the installed package's; the version folder only names it.
MODEL_PY = ("# This version runs model.onnx (beside this file) on ONNX Runtime; "
            "the adapter is the installed package's.\n"
            "from fundus_hemorrhage.backend.unet_model import TritonPythonModel  # noqa: F401\n")


versions = mc.version_numbers  # the model's numbered version folders, ascending


def version_metadata(model_dir: Path, version: int) -> dict:
    """The version's model.json ({} if missing or unreadable)."""
    try:
        return json.loads((model_dir / str(version) / "model.json").read_text())
    except (OSError, ValueError):
        return {}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_checkpoint(model_dir: Path, checkpoints: Path) -> Path:
    """The checkpoint behind the newest version: its model.json "checkpoint", relative to `checkpoints`."""
    shipped = versions(model_dir)
    if not shipped:
        raise BuildError(f"{model_dir} has no version yet: pass --checkpoint")
    name = version_metadata(model_dir, shipped[-1]).get("checkpoint")
    if not name:
        raise BuildError(f"{model_dir}/{shipped[-1]}/model.json names no checkpoint: pass --checkpoint")
    path = checkpoints / name
    if not path.is_file():
        raise BuildError(f"version {shipped[-1]} was built from checkpoint '{name}', which is not in "
                         f"{checkpoints}: put it there or pass --checkpoint")
    return path


def checkpoint_name(checkpoint: Path, checkpoints: Path) -> str:
    """What model.json records: the path inside `checkpoints` (how later builds find it), else the file name."""
    try:
        return checkpoint.resolve().relative_to(checkpoints.resolve()).as_posix()
    except ValueError:
        return checkpoint.name


def newest_built_from(model_dir: Path, checkpoint: Path, checkpoints: Path) -> tuple[int, dict] | None:
    """(version, model.json) of the newest version if it was built from this very checkpoint (same SHA-256,
    or the same file when the version recorded no hash), else None."""
    shipped = versions(model_dir)
    if not shipped:
        return None
    meta = version_metadata(model_dir, shipped[-1])
    recorded = meta.get("build", {}).get("checkpoint_sha256")
    if recorded:
        same = recorded == sha256(checkpoint)
    else:
        candidate = checkpoints / str(meta.get("checkpoint", ""))
        same = bool(meta.get("checkpoint")) and candidate.is_file() and candidate.resolve() == checkpoint.resolve()
    return (shipped[-1], meta) if same else None


def check_repository_dims(repo: Path, working_size: int) -> mc.ModelConfig | None:
    """The current unet config (None if there is none yet). BuildError if it or the preprocess model works at
    another size than `working_size` px: the working size of a model repository is fixed."""
    expected = [3, working_size, working_size]
    for name in (c.PREPROCESS, c.SEGMENTATION_MODEL):
        path = repo / name / "config.pbtxt"
        if not path.is_file():
            continue
        dims = mc.tensor_dims(mc.read_config(path), c.PIXELS)
        if dims and dims != expected:
            raise BuildError(f"the model works at {working_size} px but {path} has {c.PIXELS} {dims}: "
                             "the working size of a model repository is fixed")
    path = repo / c.SEGMENTATION_MODEL / "config.pbtxt"
    return mc.read_config(path) if path.is_file() else None


def shipped_fp32_onnx(model_dir: Path, spec: str) -> tuple[Path, dict]:
    """--onnx PATH, or 'latest': the FP32 ONNX of the newest version that has one, with its model.json
    ("source_version" added). An int8 version keeps its FP32 export as model_fp32.onnx."""
    if spec != "latest":
        path = Path(spec)
        if not path.is_file():
            raise BuildError(f"--onnx {spec}: no such file")
        meta_path = path.parent / "model.json"
        return path, json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    for version in reversed(versions(model_dir)):
        folder, meta = model_dir / str(version), version_metadata(model_dir, version)
        if (folder / "model_fp32.onnx").is_file():
            return folder / "model_fp32.onnx", {**meta, "source_version": version}
        if (folder / "model.onnx").is_file() and meta.get("precision", "fp32") == "fp32":
            return folder / "model.onnx", {**meta, "source_version": version}
    raise BuildError(f"--onnx latest: no version of {model_dir} has an FP32 ONNX")


def json_clean(value):
    """Strict JSON: NaN/inf (e.g. lesion precision with no lesion predicted) become null, tuples lists."""
    if isinstance(value, dict):
        return {k: json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return json_clean(value.item())
    return value


def write_unet_config(model_dir: Path, target: str, working_size: int, max_batch_size: int) -> None:
    """The generated unet config.pbtxt for `target` ('cpu' or 'tensorrt'), written atomically."""
    mc.write_config(model_dir / "config.pbtxt", mc.unet_config(target, working_size, max_batch_size),
                    mc.unet_header(target))


class VersionFolder:
    """unet/.building-N while a build runs (removed if it fails), unet/N once `commit` ran.

        with VersionFolder(model_dir, version) as folder:
            folder.write_onnx(fp32_onnx, "model.onnx", threshold)
            folder.commit(metadata, config_target="cpu", working_size=640, max_batch_size=16)
    """

    def __init__(self, model_dir: Path, version: int):
        self.model_dir, self.version = model_dir, version
        self.final = model_dir / str(version)
        self.path = model_dir / f".building-{version}"
        if self.final.exists():
            raise BuildError(f"{self.final} exists already: pick another --version")

    def __enter__(self) -> "VersionFolder":
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def write_onnx(self, source: Path, name: str, threshold: float) -> Path:
        """`source` -> `name` in the folder, with this version's THRESHOLD and MODEL_VERSION."""
        write_with_identity(source, self.path / name, self.version, threshold)
        return self.path / name

    def commit(self, metadata: dict, config_target: str | None, working_size: int, max_batch_size: int) -> Path:
        """model.json (+ model.py beside a model.onnx), rename to unet/N, then config.pbtxt for `config_target`
        (None: keep the current one)."""
        (self.path / "model.json").write_text(json.dumps(json_clean(metadata), indent=2, allow_nan=False) + "\n")
        if (self.path / "model.onnx").is_file():
            (self.path / "model.py").write_text(MODEL_PY)
        self.path.rename(self.final)
        if config_target is not None:  # only once the version is complete
            write_unet_config(self.model_dir, config_target, working_size, max_batch_size)
        return self.final
