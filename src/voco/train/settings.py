"""Settings of the training stages that need no torch: SSL geometry defaults, the downstream model spec.

Shared by the stages (``voco.train.pretrain_ssl``, ``voco.train.finetune``) and by ``voco check``, which validates
them without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from voco.errors import ConfigError

# SPEC 2 defaults of the SSL keys (pretrain.voco in the config overrides them)
VOCO_DEFAULTS: dict[str, dict[str, Any]] = {
    "voco": {"grid": 3, "roi": 64, "sw": 2, "hidden_dim": 1024, "out_dim": 1024, "momentum": 0.9},
    "voco-v1": {"grid": 4, "roi": 96, "sw": 2, "out_size": 64, "hidden_dim": 2048, "out_dim": 2048, "momentum": 0.9},
}

#: output-layer prefix per model name (never transferred when ``exclude_head``)
HEAD_PREFIX = {"swinunetr": "out.", "cnn_small": "out.", "unet": "final_conv.", "segresnet": "conv_final."}


def ssl_settings(cfg: Mapping[str, Any], method: str) -> dict[str, Any]:
    """SPEC 2 defaults for ``method`` overlaid with ``pretrain.voco`` (helper-owned keys pass through)."""
    out = dict(VOCO_DEFAULTS[method])
    section = dict(cfg.get("pretrain", {}).get("voco", {}) or {})
    per_method = section.pop("v1", None) if method == "voco-v1" else None
    section.pop("v1", None)
    out.update(section)
    if per_method:
        out.update(per_method)
    return out


def model_spec(cfg: Mapping[str, Any]) -> dict:
    """Model name / size / feature size from the config's ``model`` section (default: the laptop ``cnn_small``)."""
    m = cfg.get("model", {}) or {}
    spec = {"name": m.get("name", "cnn_small"), "size": m.get("size", "B"), "feature_size": m.get("feature_size")}
    if m.get("window_attention"):
        spec["window_attention"] = m["window_attention"]
    return spec


def num_classes(card: Mapping[str, Any]) -> int:
    """Segmentation: max label value + 1 (background included); classification: number of listed classes."""
    labels = {int(k): v for k, v in (card.get("labels") or {}).items()}
    if not labels:
        raise ConfigError(f"dataset card {card['id']}: needs a labels map to fine-tune")
    if card.get("task") == "classification":
        return len(labels)
    return max(labels) + 1
