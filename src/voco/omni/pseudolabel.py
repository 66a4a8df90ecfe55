"""Pseudo-labels between the omni stages (SPEC 3): the stage-1 model labels the unlabelled volumes.

Per shard (case ``i`` of the store's ok cases, manifest order, goes to shard ``i % N``): sliding-window softmax,
argmax label, per-volume confidence (mean max-probability over predicted foreground, as in curation), written as a
store-compatible folder ``OUT/shard-K/`` (``manifest.parquet`` + ``cases/<id>/label.npy``; the image stays in the
source store and is referenced by a relative path). :func:`merge` joins the shards into ``OUT/manifest.parquet``
where volumes under the confidence threshold are ``rejected`` (so :class:`voco.data.store.Store` leaves them out of
stage 2) and listed in ``OUT/low_confidence.csv``; it also writes the Dice against the full truth where the source has
``label_full`` (phantoms).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from voco.data.store import MANIFEST, Store, save_array, write_manifest
from voco.errors import DataError
from voco.io import write_json
from voco.omni.labelmaps import confidence, per_class_dice

log = logging.getLogger(__name__)

LOW_CONFIDENCE = "low_confidence.csv"


def shard_ids(ids: Sequence[str], shard: int | None, num_shards: int | None) -> list[str]:
    """Case ``i`` of ``ids`` goes to shard ``i % num_shards``; no sharding when ``shard`` is None."""
    if shard is None:
        return list(ids)
    n = int(num_shards or 1)
    if n < 1 or not 0 <= shard < n:
        raise DataError(f"shard {shard} of {num_shards}: need 0 <= shard < num_shards and num_shards >= 1")
    return [c for i, c in enumerate(ids) if i % n == shard]


def label_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    roi: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, float, int, np.ndarray]:
    """Sliding-window pseudo-label of one volume.

    Returns:
        (label uint8 (X, Y, Z), confidence, predicted-foreground voxels, probabilities float32 (C, X, Y, Z)).
    """
    from voco.eval.inference import predict_probs

    probs = predict_probs(model, image, roi, overlap=overlap, sw_batch_size=sw_batch_size, device=device).numpy()
    conf, n_fg = confidence(probs)
    return probs.argmax(0).astype(np.uint8), conf, n_fg, probs


def _foreground_sample(label: np.ndarray, n: int = 4096, seed: int = 0) -> np.ndarray:
    idx = np.flatnonzero(label.ravel() > 0)
    if idx.size > n:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    return np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int32)


def write_label_case(
    out_dir: Path,
    uid: str,
    src_store: Store,
    src_case_id: str,
    label: np.ndarray,
    meta_extra: Mapping[str, Any],
    classes: Sequence[str],
) -> dict[str, str]:
    """Write ``out_dir/cases/<uid>/{label.npy, fg.npy, meta.json}``; the image (and label_full) stay in the source
    store and are referenced by paths relative to ``out_dir``. Returns the manifest path columns."""
    from voco.data.store import case_dir

    d = case_dir(out_dir, uid)  # the id is checked and the folder stays inside out_dir
    d.mkdir(parents=True, exist_ok=True)
    save_array(d / "label.npy", label.astype(np.uint8))
    save_array(d / "fg.npy", _foreground_sample(label))
    src_row = src_store.row(src_case_id)
    rel = lambda p: os.path.relpath(src_store.root / p, out_dir) if p else ""  # noqa: E731
    case = src_store.load(src_case_id)
    meta = dict(case.meta)
    meta.pop("row", None)
    meta.update(meta_extra)
    meta["case_id"] = uid
    meta["labels"] = {str(i): c for i, c in enumerate(classes)}
    files = {
        "image": rel(src_row["image"]),
        "label": os.path.relpath(d / "label.npy", out_dir),
        "label_full": rel(src_row["label_full"]),
    }
    meta["files"] = files
    write_json(d / "meta.json", meta)
    return {**files, "meta": os.path.relpath(d / "meta.json", out_dir)}


def run_shard(
    model: torch.nn.Module,
    prep_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    classes: Sequence[str],
    roi: Sequence[int],
    full_lut: np.ndarray | None = None,
    shard: int | None = None,
    num_shards: int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    min_confidence: float = 0.0,
    device: str | torch.device | None = None,
    labelled: bool | None = False,
) -> pd.DataFrame:
    """Pseudo-label one shard of a store's ok cases (by default the unlabelled ones) into ``out_dir[/shard-K]``.

    Returns:
        the shard manifest (also written), with columns ``confidence``, ``fg_voxels``, ``dice_full`` (mean Dice vs the
        mapped full truth, NaN without one) and ``dice_per_class`` (JSON).
    """
    from tqdm import tqdm

    from voco.omni.labelmaps import map_label

    store = Store(prep_dir)
    out = Path(out_dir) / f"shard-{shard}" if shard is not None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = shard_ids(store.ids(labelled=labelled), shard, num_shards)
    rows = []
    model.eval()
    for cid in tqdm(ids, desc=f"pseudolabel {store.dataset}", mininterval=10, disable=None):
        try:  # reading and labelling one volume: whatever goes wrong is this volume's verdict, not the shard's
            case = store.load(cid)
            label, conf, n_fg, _ = label_volume(model, case.image, roi, overlap, sw_batch_size, device)
            dice_pc: dict[str, float] = {}
            if case.label_full is not None and full_lut is not None:
                truth = map_label(case.label_full, full_lut, f"{store.root}/{cid} label_full")
                d = per_class_dice(label, truth, len(classes))
                dice_pc = {classes[i]: float(d[i]) for i in range(1, len(classes)) if np.isfinite(d[i])}
        except Exception as e:  # noqa: BLE001 - one case, one verdict
            reason = f"{type(e).__name__}: {e} (case {cid} of {store.root})"
            log.warning("%s: rejected: %s", cid, reason)
            rows.append(_failed_row(store, cid, reason))
            continue
        kept = conf >= min_confidence
        paths = write_label_case(
            out, cid, store, cid, label,
            {"pseudo": {"confidence": conf, "fg_voxels": n_fg, "kept": kept}}, classes,
        )
        src = store.row(cid)
        rows.append({
            "case_id": cid, "dataset": store.dataset, "region": src["region"],
            "status": "ok" if kept else "rejected",
            "reason": "" if kept else f"low pseudo-label confidence {conf:.3f} < {min_confidence}",
            "shape": list(case.image.shape[-3:]), "spacing": src["spacing"], "split": src["split"],
            "labelled": True, "class": src.get("class", -1), **paths, "key": src["key"], "index": src["index"],
            "n_channels": src.get("n_channels", 1), "original_shape": src.get("original_shape"),
            "original_spacing": src.get("original_spacing"), "source": str(store.root),
            "confidence": conf, "fg_voxels": n_fg,
            "dice_full": float(np.mean(list(dice_pc.values()))) if dice_pc else float("nan"),
            "dice_per_class": json.dumps(dice_pc), "error": "",
        })
        log.info("%s: confidence %.3f, %d foreground voxels%s", cid, conf, n_fg,
                 f", Dice vs full truth {rows[-1]['dice_full']:.3f}" if dice_pc else "")
    return write_manifest(rows, out / MANIFEST)


def _failed_row(store: Store, cid: str, reason: str) -> dict[str, Any]:
    """The shard-manifest row of a volume that could not be pseudo-labelled (status rejected, ``error`` = reason)."""
    try:
        src = store.row(cid)
    except DataError:
        src = {}
    return {
        "case_id": cid, "dataset": store.dataset, "region": src.get("region", ""), "status": "rejected",
        "reason": reason, "shape": [], "spacing": src.get("spacing"), "split": src.get("split", ""),
        "labelled": False, "class": src.get("class", -1), "image": "", "label": "", "label_full": "", "meta": "",
        "key": src.get("key", ""), "index": src.get("index"), "n_channels": src.get("n_channels", 1),
        "original_shape": src.get("original_shape"), "original_spacing": src.get("original_spacing"),
        "source": str(store.root), "confidence": float("nan"), "fg_voxels": 0, "dice_full": float("nan"),
        "dice_per_class": "{}", "error": reason,
    }


def summarise(df: pd.DataFrame, min_confidence: float, trained: Sequence[str] | None = None) -> dict[str, Any]:
    """Summary of a merged pseudo-label manifest: counts, confidence, Dice vs full truth per class and mean."""
    per_class: dict[str, list[float]] = {}
    for s in df.get("dice_per_class", pd.Series(dtype=object)).fillna("{}"):
        for k, v in json.loads(s).items():
            per_class.setdefault(k, []).append(float(v))
    kept = df["status"] == "ok"
    dice_pc = {k: float(np.mean(v)) for k, v in per_class.items()}
    out: dict[str, Any] = {
        "cases": int(len(df)),
        "kept": int(kept.sum()),
        "dropped": int((~kept).sum()),
        "min_confidence": float(min_confidence),
        "confidence_mean": float(df["confidence"].mean()) if len(df) else float("nan"),
        "confidence_min": float(df["confidence"].min()) if len(df) else float("nan"),
        "dropped_cases": df.loc[~kept, "case_id"].astype(str).tolist(),
        "dice_per_class": dice_pc,
        "dice_mean": float(np.mean(list(dice_pc.values()))) if dice_pc else None,
        "dice_mean_kept": float(df.loc[kept, "dice_full"].mean()) if kept.any() and df["dice_full"].notna().any()
        else None,
    }
    if trained:
        sel = [v for k, v in dice_pc.items() if k in set(trained)]
        out["trained_classes"] = list(trained)
        out["dice_mean_trained_classes"] = float(np.mean(sel)) if sel else None
        case_dice = _case_dice(df, trained)
        if case_dice.notna().any():
            out["dice_mean_trained_classes_kept"] = float(case_dice[kept].mean()) if kept.any() else None
            out["threshold_sweep"] = threshold_sweep(df["confidence"].astype(float), case_dice)
    return out


def _case_dice(df: pd.DataFrame, classes: Sequence[str]) -> pd.Series:
    """Per volume: mean Dice vs the full truth over ``classes`` (those scored in it); NaN without a truth."""
    keep = set(classes)
    vals = []
    for s in df.get("dice_per_class", pd.Series([None] * len(df), index=df.index)).fillna("{}"):
        d = [v for k, v in json.loads(s).items() if k in keep]
        vals.append(float(np.mean(d)) if d else float("nan"))
    return pd.Series(vals, index=df.index, dtype=float)


SWEEP = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def threshold_sweep(conf: pd.Series, dice: pd.Series, thresholds: Sequence[float] = SWEEP) -> list[dict[str, Any]]:
    """For each confidence threshold: volumes kept and their mean Dice vs the full truth - the measurement the
    threshold (``pretrain.omni.pseudo_min_confidence``) is chosen from."""
    rows = []
    for t in thresholds:
        k = conf >= t
        rows.append({"threshold": float(t), "kept": int(k.sum()),
                     "dice_kept": float(dice[k].mean()) if k.any() and dice[k].notna().any() else None})
    return rows


def merge(
    out_dir: str | os.PathLike[str],
    num_shards: int,
    min_confidence: float,
    results_json: str | os.PathLike[str] | None = None,
    trained: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Join ``OUT/shard-*/manifest.parquet`` into ``OUT/manifest.parquet``; list the dropped volumes; summarise."""
    from voco.data.store import merge_manifests

    out = Path(out_dir)
    inputs = [out / f"shard-{k}" / MANIFEST for k in range(num_shards)]
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise DataError(f"pseudo-label shards missing: {', '.join(missing)} (run voco pseudolabel --shard K first)")
    df = merge_manifests(inputs, out / MANIFEST)
    # the threshold is (re-)applied here, so changing it needs no new inference; volumes that failed keep their reason
    conf = df["confidence"].astype(float)
    errors = df["error"].fillna("").astype(str) if "error" in df.columns else pd.Series([""] * len(df))
    kept = (conf >= float(min_confidence)) & (errors == "").to_numpy()
    df["status"] = np.where(kept, "ok", "rejected")
    df["reason"] = [
        e if e else ("" if k else f"low pseudo-label confidence {c:.3f} < {min_confidence}")
        for k, c, e in zip(kept, conf, errors, strict=True)
    ]
    df = write_manifest(df, out / MANIFEST)
    low = df[df["status"] != "ok"][["case_id", "dataset", "confidence", "reason"]]
    from voco.io import atomic_path

    with atomic_path(out / LOW_CONFIDENCE) as tmp:
        low.to_csv(tmp, index=False)
    summary = summarise(df, min_confidence, trained)
    summary["dataset"] = str(df["dataset"].iloc[0]) if len(df) else ""
    summary["manifest"] = str(out / MANIFEST)
    if results_json:
        write_json(results_json, summary)
    return summary
