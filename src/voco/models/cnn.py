"""CNN backbones with the VoCo embedding rule (global-average-pooled encoder stages, concatenated).

- ``unet``: MONAI ``BasicUNet`` (features F, F, 2F, 4F, 8F, F); embedding 16F.
- ``segresnet``: MONAI ``SegResNet`` (init_filters F, 4 levels); embedding 15F.

All use instance/group normalisation (no batch statistics), so results do not depend on how a batch is split across
DDP processes.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet, SegResNet

from voco.models.common import pool_concat


class VocoBasicUNet(BasicUNet):
    """MONAI BasicUNet with ``embed`` (pools of conv_0, down_1..down_4: 16F)."""

    decoder_prefixes = ("upcat_4.", "upcat_3.", "upcat_2.", "upcat_1.", "final_conv.")

    def __init__(self, in_channels: int = 1, out_channels: int = 2, feature_size: int = 32) -> None:
        f = feature_size
        super().__init__(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, features=(f, f, 2 * f, 4 * f, 8 * f, f)
        )
        self.feature_size = f
        self.embed_dim = 16 * f

    def encoder_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        return [x0, x1, x2, x3, x4]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, 16F); sides multiples of 16."""
        return pool_concat(self.encoder_maps(x))


class VocoSegResNet(SegResNet):
    """MONAI SegResNet with ``embed`` (pools of the four down levels: F + 2F + 4F + 8F = 15F)."""

    decoder_prefixes = ("up_layers.", "up_samples.", "conv_final.")

    def __init__(self, in_channels: int = 1, out_channels: int = 2, feature_size: int = 16) -> None:
        super().__init__(spatial_dims=3, init_filters=feature_size, in_channels=in_channels, out_channels=out_channels)
        self.feature_size = feature_size
        self.embed_dim = 15 * feature_size

    def encoder_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        _, down_x = self.encode(x)
        return down_x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, 15F); sides multiples of 8."""
        return pool_concat(self.encoder_maps(x))
