"""Method ``suprem`` (SPEC 5): supervised-only pre-training on the labelled pool, no SSL.

U-Net, SegResNet or SwinUNETR (or the laptop's small CNN) with one sigmoid output per foreground class (the VoComni
classes here; AbdomenAtlas' 25 when its cards map there), trained with Dice over the classes present + BCE
(:func:`voco.omni.losses.sigmoid_dice_bce`). With ``pretrain.suprem.labels: sources`` (default) each source's own
partial labels are used and the loss covers only the classes that source annotates (the masking of SuPreM's
predecessor); ``vocomni`` trains on the curated complete labels instead. Writes ``final.pt`` (the loop's
checkpoint, stage ``suprem``), ``backbone.pt`` (state dict for fine-tuning; the head is not transferred) and
``summary.json``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voco.errors import ConfigError
from voco.omni.losses import sigmoid_dice_bce

log = logging.getLogger(__name__)


def suprem_step(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-class sigmoid Dice + BCE, masked to the classes each crop's source annotates."""
    loss = sigmoid_dice_bce(model(batch["image"]), batch["label"], batch.get("mask"))
    return {"total": loss, "dice_bce": loss.detach()}


def run_suprem(cfg: Mapping[str, Any], args: argparse.Namespace) -> int:
    """``voco pretrain --method suprem --prep <labelled source stores> --out runs/pretrain/<run>/suprem``."""
    from voco.io import atomic_path, write_json
    from voco.models import MIN_SIDE, build_model
    from voco.omni.curation import open_sources
    from voco.omni.stage import LabelledBatches, PoolSource
    from voco.omni.stages import labelled_pool
    from voco.train import distributed as dist
    from voco.train.checkpoint import seed_everything
    from voco.train.loop import LoopConfig, train
    from voco.train.progress import read_metrics

    pre = cfg.get("pretrain", {})
    sp = dict(pre.get("suprem", {}))
    m = cfg.get("model", {}) or {}
    name = sp.get("model") or m.get("name", "cnn_small")
    size = sp.get("size") or m.get("size", "B")
    feature_size = sp.get("feature_size") or (m.get("feature_size") if name == m.get("name") else None)
    classes = list(cfg["vocomni"]["classes"])
    roi = list(sp.get("roi") or cfg["preprocess"]["roi"])
    if any(r % MIN_SIDE[name] for r in roi):
        raise ConfigError(f"pretrain.suprem.roi {roi}: model {name} needs sides that are multiples of {MIN_SIDE[name]}")
    from voco.omni.stage import LabelledPool

    if sp.get("labels", "sources") == "sources":
        sources = open_sources(args.prep, cfg, classes)
        pool = LabelledPool([PoolSource(s.store, s.lut, s.annotated) for s in sources], len(classes))
        data = {s.dataset: [classes[i] for i in np.flatnonzero(s.annotated) if i] for s in sources}
    else:
        dirs = list(args.labelled or [pre.get("omni", {}).get("labelled") or Path(cfg["paths"]["data"]) / "vocomni"])
        pool = labelled_pool(dirs, len(classes))
        data = {str(d): "all" for d in dirs}
    lcfg = LoopConfig.from_mapping(
        {"lr": sp["lr"], "weight_decay": sp["weight_decay"], "warmup": sp["warmup"],
         **{k: pre[k] for k in ("amsgrad", "grad_clip", "amp", "checkpoint_every", "log_every") if k in pre}},
        steps=args.steps or sp["steps"], seed=getattr(args, "seed", None) or pre.get("seed", 0),
        stage="suprem", method="suprem",
    )
    seed_everything(lcfg.seed)
    kwargs = {"use_checkpoint": True} if name == "swinunetr" and m.get("use_checkpoint") else {}
    model = build_model(name, 1, len(classes) - 1, size=size, feature_size=feature_size,
                        window_attention=m.get("window_attention"), **kwargs)
    crops = int(sp["crops_per_step"])
    batches = LabelledBatches(pool, roi, crops, sp["pos_neg"], seed=lcfg.seed * 1009 + 31 + dist.rank())
    out = Path(args.out)
    if dist.is_main():
        log.info("SuPreM: %s (%s) on %d labelled volumes %s, %d crops of %s per step, %d steps", name, size, len(pool),
                 data, crops, roi, lcfg.steps)
    result = train(model, suprem_step, batches, lcfg, out, run_config=dict(cfg), crops_per_step=crops,
                   progress_title=f"SuPreM supervised pre-training ({name})")
    if dist.is_main():
        with atomic_path(out / "backbone.pt") as tmp:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        recs = read_metrics(out / "metrics.jsonl")
        tail = recs[-max(1, len(recs) // 10):]
        write_json(out / "summary.json", {
            "method": "suprem", "model": name, "size": size, "feature_size": feature_size, "steps": result.step,
            "classes": classes[1:], "labels": sp.get("labels", "sources"), "data": data, "volumes": len(pool),
            "loss_first": float(np.mean([r["total"] for r in recs[:max(1, len(recs) // 10)]])) if recs else None,
            "loss_final": float(np.mean([r["total"] for r in tail])) if tail else None,
            "train_time_s": recs[-1].get("time") if recs else None,
        })
    dist.barrier()
    return 0
