"""The network of a fine-tuning run, rebuilt from its ``arch`` record: a segmentation backbone or a classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from voco.errors import ConfigError

#: ``finetune.classification_pool`` values
POOLS = ("encoder", "encoder_max")


class Classifier(nn.Module):
    """Backbone's pooled encoder maps -> linear head -> class logits (N, K).

    ``pool="encoder"``: the SPEC 2 ``embed`` (global average pools of the encoder maps, concatenated);
    ``pool="encoder_max"``: global max pools of the same maps, which keep a small local finding (a lesion) that an
    average over the whole volume dilutes.
    """

    def __init__(self, backbone: nn.Module, n_classes: int, pool: str = "encoder") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"finetune.classification_pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.backbone = backbone
        self.pool = pool
        self.head = nn.Linear(int(backbone.embed_dim), n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, embed_dim)."""
        if self.pool == "encoder":
            return self.backbone.embed(x)
        return torch.cat([m.flatten(2).amax(2) for m in self.backbone.encoder_maps(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, K) logits."""
        return self.head(self.features(x))


def build_network(arch: dict[str, Any]) -> nn.Module:
    """The network of a run from its ``arch`` record (name, size, feature_size, task, in/out channels).

    Segmentation: ``build_model(name, in_channels, out_channels, ...)``; classification: a 2-output backbone wrapped in
    :class:`Classifier` with ``out_channels`` classes.
    """
    from voco.models import build_model

    seg_k = arch["out_channels"] if arch["task"] == "segmentation" else 2
    net = build_model(arch["name"], in_channels=arch["in_channels"], out_channels=seg_k, size=arch.get("size", "B"),
                      feature_size=arch.get("feature_size"), window_attention=arch.get("window_attention"))
    if arch["task"] == "classification":
        net = Classifier(net, arch["out_channels"], arch.get("pool", "encoder"))
    return net
