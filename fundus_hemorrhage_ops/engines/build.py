"""The build of a new `unet` version, step by step (build_engines.py is its command line; see its --help).

Each step stops the build with BuildError (one line for the operator) when it fails; nothing is then left in
the repository. Paths come from the caller: this module reads no default location.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import onnx

from fundus_hemorrhage import contract as c
from fundus_hemorrhage import model_config as mc
from . import BuildError
from .identity import read_identity, strip_identity, write_with_identity
from .plan import declared_plan, served_plan
from .version_folder import (VersionFolder, check_repository_dims, checkpoint_name, default_checkpoint,
                             newest_built_from, sha256, shipped_fp32_onnx, versions)

# model.json fields that a plan built from a shipped ONNX inherits from that version.
INHERITED = ("threshold", "stage", "checkpoint", "model_config", "git_commit", "manifest_sha256", "trained",
             "val_metrics", "preprocessing")


def _say(message: str) -> None:
    print(f"build_engines: {message}", flush=True)


def package_versions(*names: str) -> dict:
    found = {}
    for name in names:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return found


def git_commit() -> str | None:
    try:
        from fundus_hemorrhage_training.common import git_commit as commit
        return commit()
    except Exception:  # no git, not a checkout: provenance is best effort
        return None


def build(args: argparse.Namespace) -> dict:
    """Write unet/N of args.model_repository; returns {"version", "folder", **model.json}. Raises BuildError."""
    from .tensorrt import require_tensorrt
    trt_version = require_tensorrt() if args.target == "tensorrt" else None  # before any slow step
    if args.onnx and args.target != "tensorrt":
        raise BuildError("--onnx is for --target tensorrt; the cpu target exports from a checkpoint")
    model_dir = Path(args.model_repository).resolve() / c.SEGMENTATION_MODEL
    shipped = versions(model_dir)
    version = args.version if args.version is not None else (shipped[-1] + 1 if shipped else 1)
    from .parity import quiet_polygraphy
    quiet_polygraphy(args.verbose)
    with VersionFolder(model_dir, version) as folder, tempfile.TemporaryDirectory(prefix="build_engines-") as tmp:
        meta, config_target, working_size, max_batch = _build_into(args, folder, Path(tmp), trt_version)
        final = folder.commit(meta, config_target, working_size, max_batch)
    return {"version": version, "folder": str(final), **meta}


def _source(args, model_dir: Path, tmp: Path):
    """The FP32 export (PIXELS -> PROBABILITY) in tmp, and what it came from."""
    plain = tmp / "model_fp32_plain.onnx"
    if args.onnx:
        from .export import check_onnx, onnx_working_size
        src, source_meta = shipped_fp32_onnx(model_dir, args.onnx)
        onnx.save(strip_identity(onnx.load(str(src))), str(plain))
        check_onnx(plain)
        working_size = onnx_working_size(plain)
        if args.working_size and args.working_size != working_size:
            raise BuildError(f"--working-size {args.working_size} but {src} works at {working_size} px")
        identity = read_identity(src)
        threshold = source_meta.get("threshold", identity[1] if identity else None)
        if threshold is None:
            raise BuildError(f"{src} has no model.json threshold and no THRESHOLD output: which threshold?")
        return {"plain": plain, "working_size": working_size, "threshold": float(threshold),
                "source_meta": source_meta, "checkpoint": None, "module": None, "ckpt": None}
    from fundus_hemorrhage_training.common import checkpoint_threshold

    from .export import export_checkpoint
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(model_dir, args.checkpoints_dir)
    if not checkpoint.is_file():
        raise BuildError(f"checkpoint {checkpoint} not found")
    _say(f"exporting {checkpoint.name}")
    module, ckpt, working_size = export_checkpoint(checkpoint, plain, args.working_size)
    return {"plain": plain, "working_size": working_size, "threshold": checkpoint_threshold(ckpt),
            "source_meta": {}, "checkpoint": checkpoint, "module": module, "ckpt": ckpt}


def _build_into(args, folder: VersionFolder, tmp: Path, trt_version: str | None):
    from .export import model_metadata, onnx_opset
    from .parity import compare_torch_onnxruntime, parity_feeds

    model_dir = folder.model_dir
    src = _source(args, model_dir, tmp)
    working_size, threshold, checkpoint = src["working_size"], src["threshold"], src["checkpoint"]
    current = check_repository_dims(model_dir.parent, working_size)
    max_batch = args.max_batch_size or (current.max_batch_size if current is not None else 0) or c.MAX_BATCH_SIZE
    photos = list(args.parity_images or [])
    feeds = parity_feeds(photos, working_size)
    build_info = {"tool": "build_engines.py", "target": args.target,
                  "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "git_commit": git_commit(), "host": platform.node(), "working_size": working_size,
                  "max_batch_size": max_batch, "opset": onnx_opset(src["plain"]),
                  "packages": package_versions("torch", "onnx", "onnxruntime", "polygraphy", "tensorrt"),
                  "identity": f"THRESHOLD {threshold} and MODEL_VERSION {folder.version} outputs "
                              "(fundus_hemorrhage_ops.engines.identity)"}
    preprocessing = served_plan(working_size)
    parity = {}
    if src["module"] is not None:
        _say("comparing ONNX Runtime with PyTorch (Polygraphy)")
        parity["onnxruntime_vs_pytorch"] = compare_torch_onnxruntime(src["module"], src["plain"], feeds, working_size)

    if checkpoint is not None:
        build_info["checkpoint_sha256"] = sha256(checkpoint)
        name = checkpoint_name(checkpoint, args.checkpoints_dir)
        if "/" not in name and not (args.checkpoints_dir / name).is_file():
            _say(f"note: {checkpoint.name} is not in the checkpoints folder; ship it there as {name} so that "
                 "later builds can find it")
        # What the version's PIXELS must be: the serving preprocessing at its working size (engines.plan).
        base = lambda precision: {**model_metadata(src["ckpt"], name, precision),  # noqa: E731
                                  "preprocessing": preprocessing}
    else:
        meta = src["source_meta"]
        base = lambda precision: {**{k: meta.get(k) for k in INHERITED}, "threshold": threshold,  # noqa: E731
                                  "precision": precision, "source_version": meta.get("source_version"),
                                  "preprocessing": declared_plan(meta)}  # the plan is the source version's
        build_info["checkpoint_sha256"] = meta.get("build", {}).get("checkpoint_sha256")

    # The FP32 graph of this version: what ships on the CPU (fp32), beside int8, or what the plan is built from.
    fp32 = tmp / "model_fp32.onnx"
    write_with_identity(src["plain"], fp32, folder.version, threshold)

    if args.target == "tensorrt":
        from .tensorrt import build_tensorrt_plan, gpu_description
        build_info.update(tensorrt=trt_version, **gpu_description())
        _say(f"building the TensorRT {trt_version} FP16 plan")
        plan = folder.path / "model.plan"
        trt = build_tensorrt_plan(fp32, plan, working_size, max_batch, args.opt_batch, feeds,
                                  strongly_typed=True if args.strongly_typed else None, workdir=tmp)
        parity["tensorrt_vs_onnxruntime"] = trt.pop("parity")
        build_info.update(tensorrt_build=trt, plan_sha256=sha256(plan))
        return {**base("fp16"), "build": build_info, "parity": parity}, "tensorrt", working_size, max_batch

    newest = newest_built_from(model_dir, checkpoint, args.checkpoints_dir)
    precision = "int8" if args.int8 else args.precision
    auto = precision == "auto"
    if auto:  # a rebuild of the newest version's checkpoint keeps its precision
        precision = "int8" if newest and newest[1].get("precision") == "int8" else "fp32"
    shipped_precision, int8 = "fp32", None
    if precision == "int8":
        from .int8 import INT8_MAX_AUPR_DROP, calibrate, cpu_int8_isa, int8_gate
        from .calibration import CACHE_FILE, cache_record, write_cache
        _say("INT8 quantization, then val evaluation of FP32 and INT8")
        build_info["cpu_int8_isa"] = cpu_int8_isa()
        int8_plain, int8_onnx = tmp / "model_int8_plain.onnx", tmp / "model_int8.onnx"
        calibration_photos, calibration, cache, source = _calibration_source(args, model_dir, newest, preprocessing)
        int8, scales = calibrate(src["plain"], int8_plain, calibration_photos, working_size,
                                 {k: v for k, v in calibration.items() if k != "cache"}, cache)
        int8["calibration_source"] = source
        write_with_identity(int8_plain, int8_onnx, folder.version, threshold)
        max_drop = INT8_MAX_AUPR_DROP if args.int8_max_aupr_drop is None else args.int8_max_aupr_drop
        int8.update(int8_gate(fp32, int8_onnx, args.manifest, working_size, threshold, max_drop))
        _say(int8["decision"])
        if int8["shipped"]:
            shipped_precision = "int8"
            shutil.copy2(int8_onnx, folder.path / "model.onnx")
            shutil.copy2(fp32, folder.path / "model_fp32.onnx")  # the source of GPU plans (--onnx latest)
            # the calibration's result, which a rebuild quantises with (engines.calibration)
            obtained = (calibration["cache"]["obtained"] if cache is not None else
                        f"calibrated on the photos above by build_engines.py ({build_info['created']}), read back "
                        "from the quantised graph (fundus_hemorrhage_ops.engines.calibration.cache_from_qdq_graph)")
            cache_path = write_cache(folder.path / CACHE_FILE, scales)
            int8["calibration"] = {**int8["calibration"], "cache": cache_record(cache_path, scales, obtained)}
    if shipped_precision == "fp32":
        shutil.copy2(fp32, folder.path / "model.onnx")
    build_info["onnx_sha256"] = sha256(folder.path / "model.onnx")

    if newest:
        parity.update(_rebuild_parity(model_dir, newest, folder.path / "model.onnx", photos, working_size,
                                      shipped_precision, auto, args.allow_mask_change, int8))
    meta = {**base(shipped_precision), "build": build_info, "parity": parity}
    if int8 is not None:
        meta["int8"] = int8
    # An existing CPU config stays as it is (hand-tuned threads); else the generated one.
    keep_config = current is not None and mc.unet_target(current) == "cpu"
    return meta, None if keep_config else "cpu", working_size, max_batch


def _calibration_source(args, model_dir: Path, newest: tuple[int, dict] | None, plan: dict):
    """(calibration photos ((id, path)) or None, their record (engines.calibration), the calibration cache to
    quantise with or None, what model.json's int8.calibration_source says).

    A rebuild of the newest version's checkpoint quantises with that version's calibration cache, whether or not
    its recorded photos are still there (the log says which are not); a version recorded without a cache is
    calibrated again on exactly its recorded set (BuildError naming what is missing or changed). --recalibrate,
    and any other build, draw a new set from --manifest."""
    from . import calibration as cal
    version, recorded = (newest[0], (newest[1].get("int8") or {}).get("calibration")) if newest else (None, None)
    if recorded and not args.recalibrate:
        cache = cal.recorded_cache(model_dir / str(version), recorded, version)
        entries = recorded.get("photos") or []
        if cache is not None:
            found, problems = cal.check(recorded, args.manifest)
            photos = (f"its {len(entries)} recorded photos are all there, unchanged" if not problems else
                      f"of its {len(entries)} recorded photos {len(found)} are there, unchanged; "
                      f"{'; '.join(problems)} (not needed)")
            _say(f"quantizing with version {version}'s calibration cache ({len(cache)} activation scales, "
                 f"{recorded['cache']['file']}), not by calibrating: {photos}")
            return None, recorded, cache, f"calibration cache of version {version} ({recorded['cache']['file']})"
        _say(f"calibrating on version {version}'s recorded set ({len(entries)} photos; it has no calibration cache)")
        return (cal.resolve(recorded, args.manifest, version), recorded, None,
                f"version {version}'s recorded photos, calibrated again (MinMax)")
    photos = cal.draw(args.manifest, args.calibration_images)
    ignored = f" (version {version}'s calibration ignored: --recalibrate)" if recorded else ""
    _say(f"calibrating on {len(photos)} training photos drawn from {args.manifest}{ignored}")
    return photos, cal.record(photos, plan, args.manifest), None, f"{len(photos)} photos calibrated (MinMax)"


def _rebuild_parity(model_dir: Path, newest: tuple[int, dict], rebuilt: Path, photos: list[Path], working_size: int,
                    precision: str, auto: bool, allow_change: bool, int8: dict | None) -> dict:
    """A rebuild of the newest version's checkpoint must serve the same masks (parity.SERVED_TOLERANCE), unless
    the operator accepts the change (`allow_change`, recorded in model.json)."""
    from .export import onnx_working_size
    from .parity import served_mask_parity

    version, meta = newest
    shipped_precision = meta.get("precision", "fp32")
    old = model_dir / str(version) / "model.onnx"
    if shipped_precision != precision:
        if auto:  # the gate decided otherwise than for the shipped version: the masks would change
            raise BuildError(f"rebuilding version {version}'s checkpoint gives {precision}, version {version} "
                             f"serves {shipped_precision}: pass --precision to choose")
        _say(f"note: version {version} serves {shipped_precision}, this build {precision}: masks not compared")
        return {}
    if not old.is_file() or onnx_working_size(old) != working_size:
        return {}
    same = served_mask_parity(old, rebuilt, photos, working_size, precision)
    if not same["passed"]:
        if allow_change:
            same["accepted_by_operator"] = True
            _say(f"served masks differ from version {version}, accepted (--allow-mask-change): {same['reason']}")
            return {f"served_masks_vs_version_{version}": same}
        hint = ""
        if int8 is not None:  # another calibration set gives other int8 scales, hence other masks
            recorded = meta.get("int8", {}).get("calibration_manifest_sha256", meta.get("manifest_sha256"))
            if recorded and recorded != int8["calibration_manifest_sha256"]:
                hint = (f" (version {version} was calibrated with manifest {recorded}, this build with "
                        f"{int8['calibration_manifest_sha256']})")
        raise BuildError(f"the rebuilt version serves other masks than version {version} ({precision}): "
                         f"{same['reason']}{hint}; --allow-mask-change ships it anyway")
    _say(f"served masks as version {version} on {same['photos']} photos: {same['differing_pixels']} of "
         f"{same['pixels']} pixels differ, min Dice {same['min_dice']:.5f}, probabilities within 1/255 on "
         f">= {100 * same['min_within_one_level']:.3f} % ({precision} tolerance)")
    return {f"served_masks_vs_version_{version}": same}
