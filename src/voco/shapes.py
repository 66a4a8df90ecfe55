"""Shape rules of the backbones, in plain Python (no torch): what ``voco check`` needs to validate crops and ROIs.

``voco.models.factory`` builds the networks from these same tables.
"""

from __future__ import annotations

MODEL_NAMES = ("swinunetr", "unet", "segresnet", "cnn_small")

#: feature size F per size letter (SwinUNETR: Swin-B/L/H as in the VoCo paper)
FEATURE_SIZES: dict[str, dict[str, int]] = {
    "swinunetr": {"B": 48, "L": 96, "H": 192},
    "unet": {"B": 32, "L": 64, "H": 128},
    "segresnet": {"B": 16, "L": 32, "H": 64},
    "cnn_small": {"B": 8, "L": 16, "H": 32},
}

#: smallest valid training crop side (all sides must be a multiple of it): SwinUNETR's patch 2 x 2^4 downsamplings
MIN_SIDE = {"swinunetr": 32, "unet": 16, "segresnet": 8, "cnn_small": 8}

#: ``model.window_attention`` values (SwinUNETR; ``voco.models.window_attention``)
WINDOW_ATTENTION_IMPLS = ("efficient", "monai")


def bad_sides(name: str, roi: list[int] | tuple[int, ...]) -> list[int]:
    """The sides of ``roi`` that model ``name`` cannot take (not a multiple of its MIN_SIDE)."""
    return [int(r) for r in roi if int(r) % MIN_SIDE[name] or int(r) <= 0]
