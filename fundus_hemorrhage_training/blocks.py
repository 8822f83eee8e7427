"""Blocks both U-Nets share (model.UNet, lite_unet.LiteUNet): conv-BN-ReLU, the FPN-style decoder, the heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Haemorrhage covers ~1% of a photo: the segmentation head starts from that prior, logit(0.01) ~ -4.6, rather
# than p = 0.5 (the prior initialisation of focal loss, Lin et al. 2017, section 3.3).
LESION_PRIOR_LOGIT = -4.6


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def segmentation_head(in_channels: int) -> nn.Conv2d:
    """1x1 conv to one logit channel, its bias at the lesion prior."""
    head = nn.Conv2d(in_channels, 1, 1)
    nn.init.constant_(head.bias, LESION_PRIOR_LOGIT)
    return head


class Decoder(nn.Module):
    """FPN-style top-down path: lateral 1x1, 2x upsample, add the skip, 3x3 conv. Output at the first level.

    features: the encoder's levels, level k [N, channels[k], H/2^k, W/2^k] -> [N, channels[0], H, W].
    `use_skips=False` (the reconstruction decoder) cannot copy the input and must go through the encoder."""

    def __init__(self, channels: tuple[int, ...], use_skips: bool = True):
        super().__init__()
        self.use_skips = use_skips
        self.laterals = nn.ModuleList(nn.Conv2d(channels[i + 1], channels[i], 1) for i in range(len(channels) - 1))
        self.blocks = nn.ModuleList(conv_bn_relu(channels[i], channels[i]) for i in range(len(channels) - 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for level in range(len(features) - 2, -1, -1):
            x = F.interpolate(self.laterals[level](x), scale_factor=2.0, mode="bilinear", align_corners=False)
            if self.use_skips:
                x = x + features[level]
            x = self.blocks[level](x)
        return x
