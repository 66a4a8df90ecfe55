"""Method ``suprem`` (SPEC 5): supervised-only pre-training on the labelled pool, no SSL.

U-Net, SegResNet or SwinUNETR (or the laptop's small CNN) with one sigmoid output per foreground class of its
training data's label maps (:func:`training_classes`: AbdomenAtlas' 25 when trained on AbdomenAtlas; with
``labels: vocomni`` the VoComni classes of the curated labels), trained with Dice over the classes present + BCE
(:func:`voco.omni.losses.sigmoid_dice_bce`). With ``pretrain.suprem.labels: sources`` (default) each source's own
partial labels are used and the loss covers only the classes that source annotates (the masking of SuPreM's
predecessor); ``vocomni`` trains on the curated complete labels instead. Writes ``final.pt`` (the loop's
checkpoint, stage ``suprem``), ``backbone.pt`` (state dict for fine-tuning; the head is not transferred) and
``summary.json``; the resumable ``last.pt`` stays until all three exist.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
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


def training_classes(prep_dirs: Sequence[str | Path], cfg: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    """SuPreM's class set from its training data's label maps (SPEC 5), and each source's place in it.

    The classes are background + the union of the sources' foreground class names (normalised, in the order they
    first appear): one AbdomenAtlas source gives its 25 classes, the laptop's two partial phantom sources the 9 organs
    they annotate between them. Each source maps its label values to those classes by name and annotates its own.

    Returns:
        (classes with background first, one :class:`voco.omni.stage.PoolSource` per store).
    Raises:
        DataError: a store has no ok labelled case. ConfigError: no source names a foreground class.
    """
    from voco.config import load_card
    from voco.data.store import Store
    from voco.errors import DataError
    from voco.omni.curation import annotated_channels, label_lut, normalise_name
    from voco.omni.stage import PoolSource

    found = []
    names: list[str] = []
    for d in prep_dirs:
        store = Store(d)
        ids = store.ids(labelled=True)
        if not ids:
            raise DataError(f"{store.root}: no ok labelled case: SuPreM trains on labelled sources")
        card = load_card(store.dataset, cfg.get("cards_dir"))
        labels = store.load(ids[0]).meta.get("labels") or card.get("labels") or {}
        own = [normalise_name(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0]
        names += [n for n in own if n not in names]
        found.append((store, card, labels))
    if not names:
        raise ConfigError(f"SuPreM: the sources {', '.join(map(str, prep_dirs))} name no foreground class")
    classes = ["background", *names]
    sources = []
    for store, card, labels in found:
        where = f"config/datasets/{card['id']}.yaml"
        lut = label_lut(labels, {}, classes, where)
        annotated = annotated_channels(card.get("annotated") or [v for k, v in labels.items() if int(k) != 0], {},
                                       classes)
        sources.append(PoolSource(store, lut, annotated))
    return classes, sources


def run_suprem(cfg: Mapping[str, Any], args: argparse.Namespace) -> int:
    """``voco pretrain --method suprem --prep <labelled source stores> --out runs/pretrain/<run>/suprem``."""
    from dataclasses import asdict

    from voco.io import write_json
    from voco.models import MIN_SIDE, build_model
    from voco.omni.stage import LabelledBatches
    from voco.omni.stages import PAPER_AUGMENT, labelled_pool
    from voco.train import distributed as dist
    from voco.train.checkpoint import finish_run, run_identity, seed_everything, store_manifests
    from voco.train.loop import LoopConfig, train
    from voco.train.progress import read_metrics

    pre = cfg.get("pretrain", {})
    sp = dict(pre.get("suprem", {}))
    m = cfg.get("model", {}) or {}
    name = sp.get("model") or m.get("name", "cnn_small")
    size = sp.get("size") or m.get("size", "B")
    feature_size = sp.get("feature_size") or (m.get("feature_size") if name == m.get("name") else None)
    roi = list(sp.get("roi") or cfg["preprocess"]["roi"])
    if any(r % MIN_SIDE[name] for r in roi):
        raise ConfigError(f"pretrain.suprem.roi {roi}: model {name} needs sides that are multiples of {MIN_SIDE[name]}")
    from voco.omni.stage import LabelledPool

    if sp.get("labels", "sources") == "sources":
        classes, pool_sources = training_classes(args.prep, cfg)
        pool = LabelledPool(pool_sources, len(classes))
        data = {s.store.dataset: [classes[i] for i in np.flatnonzero(s.annotated) if i] for s in pool_sources}
    else:
        classes = list(cfg["vocomni"]["classes"])
        dirs = list(args.labelled or [pre.get("omni", {}).get("labelled") or Path(cfg["paths"]["data"]) / "vocomni"])
        pool = labelled_pool(dirs, len(classes))
        data = {str(d): "all" for d in dirs}
    label_dirs = [] if sp.get("labels", "sources") == "sources" else dirs
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
    batches = LabelledBatches(pool, roi, crops, sp["pos_neg"], seed=lcfg.seed * 1009 + 31 + dist.rank(),
                              augment=sp.get("augment", PAPER_AUGMENT))
    out = Path(args.out)
    if dist.is_main():
        log.info("SuPreM: %s (%s) on %d labelled volumes %s, %d crops of %s per step, %d steps", name, size, len(pool),
                 data, crops, roi, lcfg.steps)
    identity = run_identity(
        {"model": {"name": name, "size": size, "feature_size": feature_size, **kwargs}, "suprem": sp,
         "loop": asdict(lcfg), "classes": classes, "roi": roi},
        data={**store_manifests(args.prep), **store_manifests(label_dirs, "labelled:")},
    )
    result = train(model, suprem_step, batches, lcfg, out, run_config=dict(cfg), identity=identity, finish=False,
                   crops_per_step=crops, progress_title=f"SuPreM supervised pre-training ({name})")
    if dist.is_main():
        from voco.models.record import backbone_meta, save_model

        # the output layer holds one sigmoid per VoComni class except background (channel k = classes[k + 1])
        save_model(out / "backbone.pt", model.state_dict(), backbone_meta(
            {"name": name, "size": size, "feature_size": feature_size}, len(classes) - 1, list(args.prep or []),
            dict(enumerate(classes[1:])), {"stage": "suprem", "method": "suprem", "steps": result.step,
                                                  "roi": list(roi)}))
        recs = read_metrics(out / "metrics.jsonl")
        tail = recs[-max(1, len(recs) // 10):]
        write_json(out / "summary.json", {
            "method": "suprem", "model": name, "size": size, "feature_size": feature_size, "steps": result.step,
            "classes": classes[1:], "labels": sp.get("labels", "sources"), "data": data, "volumes": len(pool),
            "loss_first": float(np.mean([r["total"] for r in recs[:max(1, len(recs) // 10)]])) if recs else None,
            "loss_final": float(np.mean([r["total"] for r in tail])) if tail else None,
            "train_time_s": recs[-1].get("time") if recs else None,
        })
        finish_run(out)  # final.pt, backbone.pt and summary.json exist: the resumable checkpoint can go
    dist.barrier()
    return 0
