"""``cnn_small``: a tiny residual U-Net in plain torch for the laptop demo (fast at 32^3 on CPU, no MONAI import).

Instance normalisation only (no batch statistics), so results do not depend on how a batch is split across DDP
processes. Embedding rule as every backbone: global-average-pooled encoder levels, concatenated (15F).
"""

from __future__ import annotations

import torch
from torch import nn

from voco.models.common import pool_concat


class ChannelNorm(nn.Module):
    """Per-voxel LayerNorm over channels (affine): keeps each crop's content statistics, unlike instance norm."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


NORMS = ("instance", "channel", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "channel":
        return ChannelNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"cnn_small norm must be one of {NORMS}, got {kind!r}")


class _ConvUnit(nn.Module):
    """conv(k, stride) -> InstanceNorm(affine) -> PReLU, plus a residual (identity or strided 1x1 conv)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, residual: bool = True, norm: str = "instance") -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=norm == "none")
        self.norm = _norm(norm, cout)
        self.act = nn.PReLU()
        self.skip: nn.Module | None = None
        if residual:
            same = cin == cout and stride == 1
            self.skip = nn.Identity() if same else nn.Conv3d(cin, cout, 1 if stride == 1 else stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.conv(x)))
        return y + self.skip(x) if self.skip is not None else y


class CnnSmall(nn.Module):
    """A tiny residual U-Net in plain torch: 4 levels (F, 2F, 4F, 8F), one residual conv unit each, instance norm.

    Fast on CPU at 32^3 (the laptop default) and imports no MONAI; sides must be multiples of 8.
    Embedding = pooled levels, 15F.
    """

    decoder_prefixes = ("up.", "dec.", "out.")

    def __init__(
        self, in_channels: int = 1, out_channels: int = 2, feature_size: int = 8, norm: str = "instance"
    ) -> None:
        super().__init__()
        f = feature_size
        chans = [f, 2 * f, 4 * f, 8 * f]
        self.feature_size = f
        self.embed_dim = sum(chans)
        self.norm = norm
        self.stem = _ConvUnit(in_channels, f, residual=False, norm=norm)
        self.enc = nn.ModuleList()
        prev = f
        for i, c in enumerate(chans):
            self.enc.append(_ConvUnit(prev, c, stride=1 if i == 0 else 2, norm=norm))
            prev = c
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(chans) - 1, 0, -1):
            self.up.append(nn.ConvTranspose3d(chans[i], chans[i - 1], kernel_size=2, stride=2))
            self.dec.append(_ConvUnit(2 * chans[i - 1], chans[i - 1], norm=norm))
        self.out = nn.Conv3d(f, out_channels, kernel_size=1)

    def encoder_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.stem(x)
        maps = []
        for block in self.enc:
            h = block(h)
            maps.append(h)
        return maps

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, 15F)."""
        return pool_concat(self.encoder_maps(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> logits (N, K, X, Y, Z)."""
        maps = self.encoder_maps(x)
        h = maps[-1]
        for up, dec, skip in zip(self.up, self.dec, reversed(maps[:-1]), strict=True):
            h = dec(torch.cat([up(h), skip], dim=1))
        return self.out(h)
