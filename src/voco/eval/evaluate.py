"""Evaluate a fine-tuning run on its held-out cases: sliding-window inference + metrics, per case and summarised.

Segmentation: Dice / HD95 / NSD per foreground class, in the resampled (pre-processed) space against the stored label
and in the original image geometry (class probabilities resampled to the original grid, then argmax:
:func:`voco.eval.predict.labels_in_original`, the same masks ``voco predict`` writes; compared with the original label
file). Classification: accuracy and AUC on whole-volume views.

Outputs in ``OUT``: ``cases.csv`` (long form: one row per case x space x class, plus the class mean; classification:
one row per case) and ``summary.json`` (run identity, per-class and mean metrics, the primary metric, times, device).

Inference runs on the GPU with AMP when one is visible (``device="auto"``), else on the CPU; a progress bar (periodic
lines in a log) counts the cases.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from voco.errors import DataError
from voco.eval import metrics as M
from voco.io import atomic_path, write_json

log = logging.getLogger(__name__)


def eval_ids(record: dict, split: str = "auto") -> tuple[str, list[str]]:
    """The split scored and its case ids (``auto``: test when the run has test cases, else val)."""
    if split == "auto":
        split = record.get("eval_split", "test" if record.get("test_ids") else "val")
    ids = list(record.get(f"{split}_ids") or [])
    if not ids:
        raise DataError(f"run {record.get('dataset')}: no {split} cases to evaluate on "
                        f"(test: {len(record.get('test_ids') or [])}, val: {len(record.get('val_ids') or [])})")
    return split, ids


def find_dataset_json(meta: dict) -> Path | None:
    """The dataset.json listing a case: searched upwards from the case's source image (data/nifti/<id>/...)."""
    src = meta.get("source")
    src = src[0] if isinstance(src, list) and src else src
    if not src:
        return None
    for parent in Path(src).resolve().parents:
        if (parent / "dataset.json").is_file():
            return parent / "dataset.json"
    return None


class OriginalLabels:
    """Case id -> original label file, from ``meta['label_source']`` or the case's dataset.json."""

    def __init__(self, dataset_json: str | Path | None = None) -> None:
        self._maps: dict[Path, dict[str, Path]] = {}
        self.fixed = Path(dataset_json) if dataset_json else None

    def _map(self, path: Path) -> dict[str, Path]:
        if path not in self._maps:
            from voco.data.catalog import read_dataset_json

            info = read_dataset_json(path)
            self._maps[path] = {e.case_id: e.label for e in info.entries if e.label is not None}
        return self._maps[path]

    def path(self, case_id: str, meta: dict) -> Path | None:
        if meta.get("label_source"):
            return Path(meta["label_source"])
        dj = self.fixed or find_dataset_json(meta)
        return self._map(dj).get(case_id) if dj else None


def load_label_file(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import nibabel as nib

    try:
        arr = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise DataError(f"{path}: cannot read the original label ({type(e).__name__}: {e})") from e
    arr = np.squeeze(arr)
    if tuple(arr.shape) != tuple(shape):
        raise DataError(f"{path}: original label shape {arr.shape} != the image's original shape {tuple(shape)}")
    return np.rint(arr).astype(np.int32)


def evaluate_segmentation(
    net: Any,
    record: dict,
    store: Any,
    ids: list[str],
    ecfg: dict,
    overlap: float,
    dataset_json: Path | None = None,
    save_dir: Path | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-case metrics (long DataFrame) and the summary metrics for a segmentation run.

    ``save_dir``: also write each prediction, mapped to the original geometry, as ``<save_dir>/<case>.nii.gz``.
    """
    from voco.eval.inference import predict_probs
    from voco.eval.predict import labels_in_original
    from voco.progressbar import track

    labels = {int(k): v for k, v in record["labels"].items() if int(k) != 0}
    roi = record["roi"]
    tol, pct = float(ecfg.get("nsd_tolerance_mm", 1.0)), float(ecfg.get("hd_percentile", 95))
    sw, blend = int(ecfg.get("sw_batch_size", 4)), ecfg.get("blend", "gaussian")
    original = bool(ecfg.get("original_space", True))
    extra = [float(o) for o in ecfg.get("extra_overlaps", []) if float(o) != overlap]
    originals = OriginalLabels(dataset_json)
    rows: list[dict[str, Any]] = []
    per: dict[str, list[dict]] = {"resampled": [], "original": []}
    extra_dice: dict[float, list[float]] = {o: [] for o in extra}
    missing_original = 0
    failed: list[dict[str, str]] = []
    for cid in track(ids, f"evaluate {record.get('dataset')} {record.get('init')}/{record.get('method')}", logger=log):
        # Everything about one case is computed first and kept only if all of it worked: a case that fails is recorded
        # (type, message, file) in ``failed`` and left out of every mean, and the other cases go on.
        try:
            case = store.load(cid)
            if case.label is None:
                raise DataError(f"{store.root}: case {cid} has no label to evaluate against")
            probs = predict_probs(net, case.image, roi, overlap, sw, blend)
            pred = probs.argmax(0).numpy().astype(np.uint8)
            # original geometry: probabilities resampled to the original grid, then argmax (what voco predict writes)
            pred_o = labels_in_original(probs, case.meta) if (original or save_dir is not None) else None
            del probs
            res = M.segmentation_metrics(pred, np.asarray(case.label), labels, case.meta["spacing"], tol, pct)
            more = []
            for o in extra:
                p2 = predict_probs(net, case.image, roi, o, sw, blend).argmax(0).numpy().astype(np.uint8)
                m2 = M.segmentation_metrics(p2, np.asarray(case.label), labels, case.meta["spacing"], tol, pct)
                more.append((o, M.nan_mean(v["dice"] for v in m2.values())))
            org = None
            lp = originals.path(cid, case.meta) if original else None
            if original and lp is not None and Path(lp).is_file():
                gt_o = load_label_file(Path(lp), tuple(case.meta["original_shape"]))
                org = M.segmentation_metrics(pred_o, gt_o, labels, case.meta["original_spacing"], tol, pct)
        except Exception as e:  # noqa: BLE001 - one case, one verdict
            failed.append(_failure(cid, e, store))
            continue
        per["resampled"].append(res)
        rows += _rows(cid, "resampled", res)
        for o, d in more:
            extra_dice[o].append(d)
        if save_dir is not None:
            from voco.ids import check_id, safe_join

            save_prediction(pred_o, case.meta, safe_join(save_dir, check_id(cid, f"{store.root}: case id") + ".nii.gz"))
        if org is not None:
            per["original"].append(org)
            rows += _rows(cid, "original", org)
        elif original:
            missing_original += 1
    if not per["resampled"]:
        raise DataError(f"{store.root}: every one of the {len(ids)} evaluation case(s) failed: "
                        + "; ".join(f"{f['case_id']}: {f['reason']}" for f in failed[:5]))
    if missing_original:
        log.warning("%d of %d cases have no original label file: original-space metrics %s", missing_original,
                    len(ids), "skipped" if missing_original == len(ids) else "over the others only")
    metrics = {space: (M.summarise(v) if v else None) for space, v in per.items()}
    for o, vals in extra_dice.items():
        metrics[f"dice_resampled_overlap_{o:g}"] = M.nan_mean(vals)
    space = "original" if metrics["original"] else "resampled"
    primary = {"name": "dice", "space": space, "value": metrics[space]["mean"]["dice"]}
    return pd.DataFrame(rows), {"metrics": metrics, "primary": primary, "nsd_tolerance_mm": tol, "failed": failed}


def _failure(cid: str, e: BaseException, store: Any) -> dict[str, str]:
    """A case that could not be evaluated: its id and the exception's type and message (with the store named)."""
    msg = str(e) or repr(e)
    if str(store.root) not in msg:
        msg += f" (case {cid} of {store.root})"
    log.warning("case %s: not evaluated: %s: %s", cid, type(e).__name__, msg)
    return {"case_id": cid, "reason": f"{type(e).__name__}: {msg}"}


def save_prediction(label: np.ndarray, meta: dict, path: Path) -> None:
    """Write a label map on the original voxel grid as NIfTI with the original affine (atomic)."""
    from voco.eval.predict import save_mask

    save_mask(label, np.asarray(meta["original_affine"], dtype=float), path)


def _rows(cid: str, space: str, per_class: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    out = [{"case_id": cid, "space": space, "class": k, **v} for k, v in per_class.items()]
    out.append({"case_id": cid, "space": space, "class": "mean",
                **{m: M.nan_mean(v[m] for v in per_class.values()) for m in M.SEG_KEYS}})
    return out


def evaluate_classification(net: Any, record: dict, store: Any, ids: list[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-case predictions and accuracy / AUC for a classification run (whole volume resized to the ROI)."""
    import torch

    from voco.eval.inference import autocast_for, model_device
    from voco.progressbar import track
    from voco.runs import case_class, resize_volume

    device = model_device(net)
    rows, y_true, probs, failed = [], [], [], []
    with torch.no_grad():
        for cid in track(ids, f"evaluate {record.get('dataset')} {record.get('init')}", logger=log):
            try:
                x = resize_volume(store.load(cid).image, record["roi"])[None].to(device)
                with autocast_for(device):  # AMP on CUDA, as the segmentation windows
                    logits = net(x)
                p = torch.softmax(logits.float(), 1)[0].cpu().numpy()
                t = case_class(store, cid)
            except Exception as e:  # noqa: BLE001 - one case, one verdict
                failed.append(_failure(cid, e, store))
                continue
            y_true.append(t)
            probs.append(p)
            rows.append({"case_id": cid, "class": t, "pred": int(p.argmax()), **{f"prob_{k}": float(v) for k, v in enumerate(p)}})
    if not probs:
        raise DataError(f"{store.root}: every one of the {len(ids)} evaluation case(s) failed: "
                        + "; ".join(f"{f['case_id']}: {f['reason']}" for f in failed[:5]))
    probs_a = np.stack(probs)
    acc = M.accuracy(y_true, probs_a.argmax(1))
    auc = M.multiclass_auc(y_true, probs_a)
    primary = {"name": "auc", "value": auc}  # nan (null in JSON) when the scored cases hold one class only
    return pd.DataFrame(rows), {"metrics": {"accuracy": acc, "auc": auc}, "primary": primary, "failed": failed}


def evaluate_run(
    run_dir: str | Path,
    store: Any,
    out: str | Path,
    ecfg: dict,
    overlap: float | None = None,
    split: str | None = None,
    dataset_json: str | Path | None = None,
    save_predictions: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate one fine-tuning run; write ``cases.csv`` and ``summary.json`` to ``out``; return the summary.

    ``save_predictions``: segmentation predictions in the original geometry go to ``out/predictions/<case>.nii.gz``.
    ``device``: ``auto`` (the GPU with AMP when one is visible) | ``cpu`` | ``cuda``.
    """
    import torch

    from voco.devices import select_device
    from voco.runs import load_run

    out = Path(out)
    dev = select_device(device)
    run = load_run(run_dir)
    record, net = run.record, run.net.to(dev)
    log.info("evaluating %s on %s%s", run_dir, dev, " with AMP" if dev.type == "cuda" else "")
    overlap = float(ecfg.get("overlap", 0.75) if overlap is None else overlap)
    split_name, ids = eval_ids(record, split or ecfg.get("split", "auto"))
    t0 = time.perf_counter()
    with torch.no_grad():
        if record["task"] == "classification":
            cases, res = evaluate_classification(net, record, store, ids)
        else:
            cases, res = evaluate_segmentation(net, record, store, ids, ecfg, overlap,
                                               Path(dataset_json) if dataset_json else None,
                                               out / "predictions" if save_predictions else None)
    eval_s = time.perf_counter() - t0
    summary = {
        "dataset": record["dataset"], "task": record["task"], "init": record["init"], "method": record["method"],
        "n_train": record["n_train"], "n_train_used": record["n_train_used"], "seed": record["seed"],
        "split": split_name, "n_cases": len(ids) - len(res["failed"]), "n_failed": len(res["failed"]),
        "overlap": overlap, **res,
        "run": str(run_dir), "init_source": record.get("init_source"), "train_seconds": record.get("train_seconds"),
        "eval_seconds": round(eval_s, 3), "transfer": record.get("transfer"), "device": str(dev),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "cases.csv") as tmp:
        cases.to_csv(tmp, index=False)
    write_json(out / "summary.json", _finite(summary))
    p = summary["primary"]
    log.info("%s %s/%s N=%s seed %s: %s %s = %.4f on %d %s cases (%.1f s)", record["dataset"], record["init"],
             record["method"], record["n_train"], record["seed"], p.get("space", ""), p["name"],
             p["value"] if p["value"] is not None else float("nan"), len(ids), split_name, eval_s)
    return summary


def _finite(obj: Any) -> Any:
    """nan / inf -> None so that summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
