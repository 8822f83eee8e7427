"""Train the optic-disc and fovea detector (`fundus_hemorrhage.anatomy`) and export it to ONNX.

A small fully-convolutional heatmap network on the working grid reduced 4x (PIXELS [N, 3, 640, 640] ->
80 x 80 inside the graph): for each landmark, a softmax over the 20 x 20 cells of the grid plus one "absent"
cell. Trained on the 441 IDRiD grading photos with disc and fovea centres (`fundus_hemorrhage_training.anatomy_data`, 15% held out
to tune on); never on the 54 IDRiD segmentation photos, which are the test set (`fundus_hemorrhage_training.evaluate_anatomy`).

Augmentation: mirror (a left eye becomes a right eye, labels follow), rotation, zoom, shift, colour and blur;
and "re-centred" photos: the grid re-centred near the disc (as disc-centred photos are), zoomed in and cut to a
new circular field of view, so that a landmark outside the field of view is labelled absent.

    python -m fundus_hemorrhage_training.train_anatomy --epochs 60 --out fundus_hemorrhage/models/anatomy.onnx
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_hemorrhage.anatomy import CELLS, INPUT_REDUCTION, LANDMARKS, MODEL_PATH, OUTPUT
from fundus_hemorrhage.contract import PIXELS, WORKING_SIZE

from .anatomy_data import CACHE_SIZE, load
from .common import REPO_ROOT

NET_SIZE = WORKING_SIZE // INPUT_REDUCTION  # 80: the network's input side
CELL = NET_SIZE / CELLS  # network pixels per heatmap cell
SIGMA_CELLS = 0.75  # Gaussian target's standard deviation, cells (24 working pixels, ~0.25 disc diameter)


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LandmarkNet(nn.Module):
    """[N, 3, 80, 80] RGB in [0, 1] -> logits [N, 2, CELLS * CELLS + 1] (disc, fovea; the last is "absent")."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.stem = _conv(3, w, 2)  # 40
        self.down1 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))  # 20: the heatmap cells
        self.down2 = nn.Sequential(_conv(2 * w, 3 * w, 2), _conv(3 * w, 3 * w))  # 10
        self.down3 = nn.Sequential(_conv(3 * w, 4 * w, 2), _conv(4 * w, 4 * w, dilation=2),
                                   _conv(4 * w, 4 * w, dilation=2))  # 5: sees the whole field
        self.up2 = _conv(7 * w, 3 * w)
        self.up1 = _conv(5 * w, 2 * w)
        self.head = nn.Conv2d(2 * w, len(LANDMARKS), 1)
        self.absent = nn.Linear(4 * w, len(LANDMARKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x20 = self.down1(self.stem(x))
        x10 = self.down2(x20)
        x5 = self.down3(x10)
        y = self.up2(torch.cat([F.interpolate(x5, scale_factor=2.0, mode="nearest"), x10], 1))
        y = self.up1(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), x20], 1))
        maps = self.head(y).flatten(2)  # [N, 2, CELLS^2]
        absent = self.absent(x5.mean(dim=(2, 3)))[:, :, None]
        return torch.cat([maps, absent], 2)


class LandmarkExport(nn.Module):
    """What is served: PIXELS [N, 3, 640, 640] -> per-landmark probabilities [N, 2, CELLS^2 + 1]."""

    def __init__(self, net: LandmarkNet):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(pixels, INPUT_REDUCTION)  # = INTER_AREA at an integer factor
        return torch.softmax(self.net(x), dim=2)


def _affine(rng: np.random.Generator, disc: np.ndarray, fovea: np.ndarray, recentre: bool
            ) -> tuple[np.ndarray, bool, float]:
    """2x3 map from cache pixels to network pixels, whether it mirrors, and the new FOV radius (0: keep)."""
    k = NET_SIZE / CACHE_SIZE
    c = CACHE_SIZE / 2.0
    if recentre:  # a disc-centred (or otherwise off-centre) photo with a narrower field
        t = rng.uniform(-0.4, 1.4) if np.isfinite(fovea).all() else 0.0
        centre = disc + t * ((fovea - disc) if np.isfinite(fovea).all() else 0) + rng.normal(0, 10, 2)
        # Half at the photo's own scale (a disc-centred photo of the same camera: the fovea near the edge),
        # half zoomed in (a narrower field: the fovea often outside).
        zoom = rng.uniform(1.0, 1.1) if rng.random() < 0.5 else rng.uniform(1.1, 1.7)
        radius = NET_SIZE / 2.0 * rng.uniform(0.85, 1.0)
    else:
        centre = np.array([c, c]) + rng.uniform(-0.06, 0.06, 2) * CACHE_SIZE
        zoom, radius = rng.uniform(0.85, 1.15), 0.0
    angle = rng.uniform(-15, 15)
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, zoom * k)
    m[:, 2] += NET_SIZE / 2.0 - centre  # the rotation keeps `centre` fixed: move it to the grid's centre
    mirror = rng.random() < 0.5
    if mirror:
        m = np.array([[-1.0, 0, NET_SIZE - 1.0], [0, 1, 0]]) @ np.vstack([m, [0, 0, 1]])
    return m, mirror, radius


def augment(rng: np.random.Generator, pixels: np.ndarray, disc: np.ndarray, fovea: np.ndarray,
            p_recentre: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: float32 [3, 80, 80] and landmark cells float32 [2, 2] (NaN: absent)."""
    k = CACHE_SIZE / WORKING_SIZE  # pixel centres: cache x = (working x + 0.5) k - 0.5
    disc_c, fovea_c = (disc + 0.5) * k - 0.5, (fovea + 0.5) * k - 0.5
    m, _, radius = _affine(rng, disc_c, fovea_c, rng.random() < p_recentre)
    # Warp at twice the size, then halve by area: close to the graph's average pooling, little aliasing.
    m2 = m * 2.0
    big = cv2.warpAffine(pixels, m2, (2 * NET_SIZE, 2 * NET_SIZE), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT)
    img = cv2.resize(big, (NET_SIZE, NET_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    pts = np.stack([disc_c, fovea_c]) @ m[:, :2].T + m[:, 2]
    if radius:
        yy, xx = np.mgrid[:NET_SIZE, :NET_SIZE]
        img *= (((xx - NET_SIZE / 2 + 0.5) ** 2 + (yy - NET_SIZE / 2 + 0.5) ** 2) <= radius**2)[..., None]
    # Colour: per-channel gain, gamma, blur, noise (zero stays zero outside the field of view).
    img = np.clip(img * rng.uniform(0.8, 1.2, 3).astype(np.float32), 0, 1) ** np.float32(rng.uniform(0.7, 1.4))
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.5))
    img = np.clip(img + rng.normal(0, 0.01, img.shape).astype(np.float32) * (img > 0), 0, 1)
    # A landmark off the grid, outside the (new) field of view, or in black, is absent.
    inside = np.ones(2, bool) if not radius else np.hypot(*(pts - NET_SIZE / 2).T) < radius * 0.97
    gray = img.max(axis=2)
    for i, (x, y) in enumerate(pts):
        if not (np.isfinite(x) and 0 <= x < NET_SIZE and 0 <= y < NET_SIZE and inside[i]
                and gray[int(y), int(x)] > 0.02):
            pts[i] = np.nan
    return np.ascontiguousarray(img.transpose(2, 0, 1)), ((pts + 0.5) / CELL).astype(np.float32)  # cell units


def targets(cells: torch.Tensor) -> torch.Tensor:
    """[N, 2, 2] landmark positions in cell units, 0 at the grid's edge (NaN: absent) -> target distributions [N, 2, CELLS^2 + 1]."""
    n = cells.shape[0]
    grid = torch.arange(CELLS, dtype=torch.float32) + 0.5
    gx = torch.exp(-0.5 * ((grid[None, None, :] - cells[..., 0:1]) / SIGMA_CELLS) ** 2)  # [N, 2, C]
    gy = torch.exp(-0.5 * ((grid[None, None, :] - cells[..., 1:2]) / SIGMA_CELLS) ** 2)
    maps = (gy[..., :, None] * gx[..., None, :]).reshape(n, len(LANDMARKS), -1)
    absent = torch.isnan(cells[..., 0])
    maps = torch.nan_to_num(maps / maps.sum(2, keepdim=True).clamp_min(1e-12))
    return torch.cat([maps * (~absent)[..., None], absent[..., None].float()], 2)


def train(epochs: int, batch: int, lr: float, seed: int, holdout: float, width: int) -> tuple[LandmarkNet, dict]:
    torch.manual_seed(seed)
    data = load("grading")
    n = len(data["ids"])
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = order[: int(round(holdout * n))], order[int(round(holdout * n)):]
    net = LandmarkNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_idx) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(epochs):
        net.train()
        t0, losses = time.time(), []
        perm = rng.permutation(train_idx)
        for start in range(0, len(perm), batch):
            idx = perm[start:start + batch]
            samples = [augment(rng, data["pixels"][i], data["disc"][i], data["fovea"][i]) for i in idx]
            x = torch.from_numpy(np.stack([s[0] for s in samples]))
            y = targets(torch.from_numpy(np.stack([s[1] for s in samples])))
            loss = -(y * F.log_softmax(net(x), 2)).sum(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - t0, 1)}
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            record.update(validate(net, data, val_idx))
        history.append(record)
        print(json.dumps(record), flush=True)
    return net, {"train_ids": [str(data["ids"][i]) for i in train_idx],
                 "holdout_ids": [str(data["ids"][i]) for i in val_idx], "history": history}


@torch.no_grad()
def validate(net: LandmarkNet, data: dict, idx: np.ndarray) -> dict:
    """Median and worst error (working pixels) of the soft location on held-out photos, unaugmented."""
    from fundus_hemorrhage.anatomy import decode_landmarks

    net.eval()
    x = torch.from_numpy(data["pixels"][idx].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    probs = torch.softmax(net(F.avg_pool2d(x, CACHE_SIZE // NET_SIZE)), 2).numpy()
    out = {}
    for j, name in enumerate(LANDMARKS):
        found = [decode_landmarks(p[j]) for p in probs]
        pred = np.array([f[0] for f in found])
        err = np.hypot(*(pred - data[name][idx]).T)
        out[f"{name}_median_px"] = round(float(np.median(err)), 1)
        out[f"{name}_p90_px"] = round(float(np.percentile(err, 90)), 1)
        out[f"{name}_max_px"] = round(float(err.max()), 1)
    return out


def export(net: LandmarkNet, path: Path) -> Path:
    """ONNX (opset 17, dynamic batch): input PIXELS, output `anatomy.OUTPUT`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(LandmarkExport(net.eval()), torch.rand(1, 3, WORKING_SIZE, WORKING_SIZE), str(path),
                      input_names=[PIXELS], output_names=[OUTPUT],
                      dynamic_axes={PIXELS: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.15, help="fraction of the grading photos to tune on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 on the shared 2-core machine ran 5x slower)")
    parser.add_argument("--out", type=Path, default=MODEL_PATH)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net, record = train(args.epochs, args.batch, args.lr, args.seed, args.holdout, args.width)
    export(net, args.out)
    record = {"arguments": vars(args) | {"out": _relative(args.out)}} | record
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
