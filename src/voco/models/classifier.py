"""The network of a fine-tuning run, rebuilt from its ``arch`` record: a segmentation backbone or a classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Classifier(nn.Module):
    """Backbone's pooled-encoder embedding (SPEC 2 ``embed``) -> linear head -> class logits (N, K)."""

    def __init__(self, backbone: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.embed_dim), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, K) logits."""
        return self.head(self.backbone.embed(x))


def build_network(arch: dict[str, Any]) -> nn.Module:
    """The network of a run from its ``arch`` record (name, size, feature_size, task, in/out channels).

    Segmentation: ``build_model(name, in_channels, out_channels, ...)``; classification: a 2-output backbone wrapped in
    :class:`Classifier` with ``out_channels`` classes.
    """
    from voco.models import build_model

    seg_k = arch["out_channels"] if arch["task"] == "segmentation" else 2
    net = build_model(arch["name"], in_channels=arch["in_channels"], out_channels=seg_k, size=arch.get("size", "B"),
                      feature_size=arch.get("feature_size"))
    if arch["task"] == "classification":
        net = Classifier(net, arch["out_channels"])
    return net
