"""Self-describing model files: weights plus everything needed to use them on a new scan.

Every model the pipeline saves (a fine-tuned ``model.pt``, a pre-training ``backbone.pt``) is a weights-only
``torch.save`` of::

    {"model": state_dict, "meta": META, "arch": ARCH}      # "arch": the fine-tuning record, kept for older readers

where ``META`` holds plain values only (so ``torch.load(weights_only=True)`` reads it)::

    format        "voco-model/1"
    kind          "finetune" | "backbone"
    architecture  {name, builder: "voco.models.build_model", args: {...}, task, monai: {target, args} or None}
    labels        {"0": "background", "1": "spleen", ...} (segmentation classes or classification classes; {} for SSL)
    preprocess    {version, orientation, spacing, window, modality, roi, storage_dtype, crop, region}
                  (pre-training backbones: {"datasets": {dataset: the same record}})
    inference     {roi, overlap, sw_batch_size, blend} (fine-tuned segmentation models)
    training      free-form provenance (dataset, init, method, steps, seed ...)

``architecture.monai`` names the plain MONAI network with identical parameter names where there is one (SwinUNETR,
BasicUNet, SegResNet), so the weights load without voco; ``cnn_small`` is voco's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from voco.errors import CheckpointError

FORMAT = "voco-model/1"


def monai_equivalent(arch: Mapping[str, Any]) -> dict[str, Any] | None:
    """The MONAI network (``_target_`` and arguments) whose state dict equals ours, or None (``cnn_small``, classifiers)."""
    if arch.get("task", "segmentation") != "segmentation":
        return None
    from voco.models.factory import feature_size_for

    f = feature_size_for(arch["name"], arch.get("size", "B"), arch.get("feature_size"))
    c_in, c_out = int(arch["in_channels"]), int(arch["out_channels"])
    if arch["name"] == "swinunetr":
        return {"target": "monai.networks.nets.SwinUNETR",
                "args": {"in_channels": c_in, "out_channels": c_out, "feature_size": f, "use_v2": True}}
    if arch["name"] == "unet":
        return {"target": "monai.networks.nets.BasicUNet",
                "args": {"spatial_dims": 3, "in_channels": c_in, "out_channels": c_out,
                         "features": [f, f, 2 * f, 4 * f, 8 * f, f]}}
    if arch["name"] == "segresnet":
        return {"target": "monai.networks.nets.SegResNet",
                "args": {"spatial_dims": 3, "init_filters": f, "in_channels": c_in, "out_channels": c_out}}
    return None


def architecture(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The ``architecture`` entry of META from an ``arch`` record (name, size, feature_size, task, in/out channels)."""
    from voco.models.factory import feature_size_for

    f = feature_size_for(arch["name"], arch.get("size", "B"), arch.get("feature_size"))
    return {
        "name": arch["name"],
        "builder": "voco.models.build_model" if arch.get("task", "segmentation") == "segmentation"
        else "voco.models.classifier.build_network",
        "args": {"in_channels": int(arch["in_channels"]), "out_channels": int(arch["out_channels"]),
                 "size": arch.get("size", "B"), "feature_size": int(f)},
        "task": arch.get("task", "segmentation"),
        "monai": monai_equivalent(arch),
    }


def preprocess_record(case_meta: Mapping[str, Any]) -> dict[str, Any]:
    """How a stored case was pre-processed (its ``meta.json``): what a new scan must go through before the model."""
    p = case_meta.get("params") or {}
    return {
        "version": case_meta.get("version"),
        "orientation": "RAS",
        "spacing": [float(s) for s in p.get("spacing", case_meta.get("spacing", []))],
        "window": [float(w) for w in p.get("window", case_meta.get("window", []))],
        "modality": list(p.get("modality", ["CT"])),
        "roi": [int(r) for r in p.get("roi", [])],
        "storage_dtype": str(p.get("storage_dtype", "float16")),
        "crop": "foreground",
        "region": case_meta.get("region"),
    }


def stores_preprocess(prep_dirs: Iterable[str | os.PathLike[str]]) -> dict[str, dict[str, Any]]:
    """``{dataset: preprocess_record}`` of the first ok case of each pre-processed store (pre-training corpora)."""
    from voco.data.store import Store

    out: dict[str, dict[str, Any]] = {}
    for d in prep_dirs:
        try:
            store = Store(d)
        except Exception:  # noqa: BLE001 - a description must never fail a finished training run
            continue
        ids = store.ids()
        if ids:
            out[store.dataset] = preprocess_record(store.load(ids[0]).meta)
    return out


def model_meta(
    arch: Mapping[str, Any],
    kind: str,
    labels: Mapping[Any, str] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    inference: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """META for :func:`save_model` (see the module docstring)."""
    from voco import __version__

    return {
        "format": FORMAT,
        "voco_version": __version__,
        "kind": kind,
        "architecture": architecture(arch),
        "labels": {str(k): str(v) for k, v in (labels or {}).items()},
        "preprocess": dict(preprocess or {}),
        "inference": dict(inference or {}),
        "training": dict(training or {}),
    }


def save_model(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    arch: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"model", "meta"[, "arch"]}`` atomically (tensors moved to the CPU)."""
    from voco.io import atomic_path

    blob: dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in state_dict.items()}, "meta": dict(meta)}
    if arch is not None:
        blob["arch"] = dict(arch)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return Path(path)


def read_model(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, META) of a model file; META is ``{}`` for a bare state dict (a released or older file)."""
    from voco.models.transfer import extract_state_dict, read_checkpoint

    blob = read_checkpoint(path)
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: not a model file (a dict of tensors or {{'model': ..., 'meta': ...}})")
    meta = blob.get("meta") if isinstance(blob.get("meta"), dict) else {}
    if not meta and isinstance(blob.get("arch"), dict):  # fine-tuned model.pt written before META existed
        meta = model_meta(blob["arch"], "finetune")
    state = extract_state_dict(blob, str(path))
    return state, dict(meta)


def backbone_meta(
    model: Mapping[str, Any],
    out_channels: int,
    prep_dirs: Iterable[str | os.PathLike[str]] = (),
    labels: Mapping[Any, str] | None = None,
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """META of a pre-training ``backbone.pt``: the backbone (``model``: name / size / feature_size, one input channel,
    ``out_channels`` outputs), the classes of its output layer (omni / SuPreM) and the pre-processing of every corpus
    store it saw (``{"datasets": {dataset: record}}``)."""
    arch = {"name": model.get("name", "cnn_small"), "size": model.get("size", "B"),
            "feature_size": model.get("feature_size"), "task": "segmentation", "in_channels": 1,
            "out_channels": int(out_channels)}
    return model_meta(arch, "backbone", labels, {"datasets": stores_preprocess(prep_dirs)}, {}, training)
