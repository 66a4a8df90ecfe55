"""Regenerate ``released_checkpoints.json``: tensor names and shapes of the released VoCo / VoComni / SuPreM files.

How the list was derived (read from the official repositories, none of their code is used or copied):

* Luffy03/Large-Scale-Medical, ``Self-supervised/models/voco_head.py``: ``VoCoHead`` = ``backbone`` (class ``Swin``:
  ``swinViT`` = MONAI ``SwinTransformer`` v2 with depths 2-2-2-2, heads 3-6-12-24, window 7, patch 2; ``encoder1``,
  ``encoder2``, ``encoder3``, ``encoder4``, ``encoder10`` = MONAI ``UnetrBasicBlock`` residual, instance norm; no
  decoder) + ``student`` / ``teacher`` projection heads (``layer1`` Linear(24F -> 1024) + BatchNorm1d without affine
  or running stats, ``layer2`` Linear(1024, 1024) + BN, ``layer3`` Linear(1024, 1024)). ``voco_train.py`` saves
  ``{"state_dict": model.state_dict(), ...}`` of the DDP-wrapped model: every key starts with ``module.``.
  Released as ``VoCo_{B,L,H}_SSL_head.pt``.
* the same repository, ``README.md`` "Load Pre-trained models": ``VoComni_{B,L,H}.pt`` load into MONAI
  ``SwinUNETR(use_v2=True, out_channels=21)`` by exact name match (``state_dict`` entry or the bare dict): plain
  SwinUNETR names, 21 output channels.
* Luffy03/VoCo (CVPR 2024), ``models/voco_head.py`` + ``Finetune/*/main.py``: a ``Swin`` backbone (encoders + a
  ``proj_head``: Linear(24F -> 2048) + BN, Linear(2048, 2048) + BN, Linear(2048, 2048)) whose keys the fine-tuning
  loader fixes for ``module.`` and ``swin_vit`` -> ``swinViT``: recorded here with both.
* MrGiovanni/SuPreM, ``direct_inference/inference.py`` + ``model/Universal_model.py``: ``torch.load(...)["net"]``
  of a DDP ``Universal_model``: ``module.backbone.`` + SwinUNETR v1 names (``swinViT``, encoders, decoders; no ``out``),
  plus ``precls_conv`` (GroupNorm(16, 48), Conv3d(48, 8, 1)), ``GAP`` (GroupNorm(16, 768), Conv3d(768, 256, 1)),
  ``controller`` (Conv3d(512, 153, 1)), ``organ_embedding`` (buffer 25 x 512, word embedding) and ``text_to_vision``
  (Linear(512, 256)). Released as ``supervised_suprem_swinunetr_2100.pth``.

The MONAI blocks the official code imports give the inner names and shapes; this script composes them with the
official attribute names and prefixes. Run it only to refresh the JSON (``python tests/data/make_released_keys.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from monai.networks.nets import SwinUNETR

F = 48  # Swin-B


def swinunetr(use_v2: bool, out_channels: int, decoder: bool = True, out: bool = True) -> dict[str, list[int]]:
    sd = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=F, use_v2=use_v2).state_dict()
    keep = {}
    for k, v in sd.items():
        if not decoder and k.startswith(("decoder", "out.")):
            continue
        if not out and k.startswith("out."):
            continue
        keep[k] = list(v.shape)
    return keep


def head(prefix: str, in_dim: int, hidden: int, out_dim: int) -> dict[str, list[int]]:
    # BatchNorm1d(affine=False, track_running_stats=False) has no tensors
    return {f"{prefix}.layer1.0.weight": [hidden, in_dim], f"{prefix}.layer1.0.bias": [hidden],
            f"{prefix}.layer2.0.weight": [hidden, hidden], f"{prefix}.layer2.0.bias": [hidden],
            f"{prefix}.layer3.0.weight": [out_dim, hidden], f"{prefix}.layer3.0.bias": [out_dim]}


def main() -> None:
    enc = swinunetr(True, 2, decoder=False)
    layouts = {}
    ssl = {f"module.backbone.{k}": s for k, s in enc.items()}
    ssl |= {f"module.{k}": s for k, s in head("student", 24 * F, 1024, 1024).items()}
    ssl |= {f"module.{k}": s for k, s in head("teacher", 24 * F, 1024, 1024).items()}
    layouts["voco_ssl_head"] = {"file": "VoCo_B_SSL_head.pt", "wrapper": "state_dict", "tensors": ssl}
    layouts["vocomni"] = {"file": "VoComni_B.pt", "wrapper": "state_dict", "tensors": swinunetr(True, 21)}
    v1 = {f"module.{k.replace('swinViT.', 'swin_vit.', 1)}": s for k, s in enc.items()}
    v1 |= {f"module.{k}": s for k, s in head("proj_head", 24 * F, 2048, 2048).items()}
    layouts["voco_v1"] = {"file": "VoCo_10k.pt", "wrapper": None, "tensors": v1}
    sup = {f"module.backbone.{k}": s for k, s in swinunetr(False, 2, out=False).items()}
    sup |= {"module.precls_conv.0.weight": [48], "module.precls_conv.0.bias": [48],
            "module.precls_conv.2.weight": [8, 48, 1, 1, 1], "module.precls_conv.2.bias": [8],
            "module.GAP.0.weight": [768], "module.GAP.0.bias": [768],
            "module.GAP.3.weight": [256, 768, 1, 1, 1], "module.GAP.3.bias": [256],
            "module.controller.weight": [153, 512, 1, 1, 1], "module.controller.bias": [153],
            "module.organ_embedding": [25, 512],
            "module.text_to_vision.weight": [256, 512], "module.text_to_vision.bias": [256]}
    layouts["suprem_swinunetr"] = {"file": "supervised_suprem_swinunetr_2100.pth", "wrapper": "net", "tensors": sup}
    doc = {"feature_size": F, "monai_version_used_to_expand_blocks": __import__("monai").__version__,
           "torch_version": torch.__version__, "layouts": layouts}
    out = Path(__file__).with_name("released_checkpoints.json")
    out.write_text(json.dumps(doc, indent=0, sort_keys=False) + "\n")
    print(out, {k: len(v["tensors"]) for k, v in layouts.items()})


if __name__ == "__main__":
    main()
