"""Helpers shared by the backbones."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_concat(maps: list[torch.Tensor]) -> torch.Tensor:
    """Global-average-pool each (N, C_i, ...) map and concatenate: -> (N, sum C_i)."""
    return torch.cat([F.adaptive_avg_pool3d(m, 1).flatten(1) for m in maps], dim=1)
