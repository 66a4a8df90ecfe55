"""Segment new scans with a fine-tuned run: ``voco predict -i IN -o OUT --run RUN``.

Each scan goes through the run's own pre-processing (read from the run: RAS, spacing, HU window, foreground crop,
ROI padding, storage precision), sliding-window inference (GPU + AMP when one is visible), then the class
probabilities are resampled to the scan's original voxel grid (linear) and the argmax is written as a NIfTI mask with
the scan's own affine and shape. Evaluation uses the same functions (:func:`labels_in_original`), so a mask written
here equals the prediction ``voco evaluate`` scores in the original geometry.

Inputs (IN): one NIfTI file, a folder of NIfTI files, a DICOM series folder, or a folder whose sub-folders are DICOM
series. A scan that cannot be read or pre-processed is reported (``OUT/predict.json`` and the log) and the others go
on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voco.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
REPORT = "predict.json"


@dataclass(frozen=True)
class Scan:
    """One input scan: ``kind`` is ``nifti`` (a file) or ``dicom`` (a series folder); ``name`` names its mask."""

    name: str
    kind: str
    path: Path


def _nifti_name(path: Path) -> str | None:
    low = path.name.lower()
    for suf in NIFTI_SUFFIXES:
        if low.endswith(suf) and len(path.name) > len(suf):
            return path.name[: -len(suf)]
    return None


def _has_dicom_files(folder: Path) -> bool:
    from voco.data.dicom import _is_dicom_candidate

    return any(_is_dicom_candidate(p) for p in folder.rglob("*"))


def find_scans(inp: str | os.PathLike[str]) -> list[Scan]:
    """The scans of IN (see the module docstring), in name order.

    Raises:
        DataError: IN does not exist or holds no NIfTI file and no DICOM series.
    """
    inp = Path(inp)
    if not inp.exists():
        raise DataError(f"{inp}: input not found (a NIfTI file, a folder of NIfTI files or a DICOM series folder)")
    if inp.is_file():
        name = _nifti_name(inp)
        return [Scan(name, "nifti", inp)] if name else [Scan(inp.parent.name, "dicom", inp.parent)]
    from voco.data.dicom import _is_dicom_candidate

    files = sorted(p for p in inp.iterdir() if p.is_file() and not p.name.startswith("."))
    scans = [Scan(n, "nifti", p) for p in files if (n := _nifti_name(p))]
    if not scans and any(_is_dicom_candidate(p) for p in files):
        return [Scan(inp.name, "dicom", inp)]  # IN is one series folder (its files, and any sub-folders, are read)
    for d in sorted(p for p in inp.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _has_dicom_files(d):
            scans.append(Scan(d.name, "dicom", d))
    if not scans:
        raise DataError(f"{inp}: no NIfTI file (.nii / .nii.gz) and no DICOM series folder found")
    seen: dict[str, int] = {}
    out = []
    for s in scans:  # a.nii and a.nii.gz, or a file and a folder of the same name: keep every mask
        k = seen.get(s.name, 0)
        seen[s.name] = k + 1
        out.append(s if k == 0 else Scan(f"{s.name}_{k}", s.kind, s.path))
    return out


def read_scan(scan: Scan, n_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """((C, X, Y, Z) float32 image in the file's voxel order, its (4, 4) affine); DICOM series are read as
    dicom2nifti would write them (LAS)."""
    if scan.kind == "nifti":
        from voco.data.preprocess import read_image

        return read_image((scan.path,), n_channels)
    from voco.data.dicom import read_series

    vol = read_series(scan.path)
    image = np.asarray(vol.array, dtype=np.float32)[None]
    if n_channels != 1:
        raise DataError(f"{scan.path}: a DICOM series is one channel; the run expects {n_channels}")
    return image, np.asarray(vol.affine, dtype=np.float64)


def preprocess_params(preprocess: dict[str, Any], where: str) -> Any:
    """:class:`voco.data.preprocess.Params` from a run's pre-processing record."""
    from voco.data.preprocess import Params

    missing = [k for k in ("spacing", "window", "roi") if not preprocess.get(k)]
    if missing:
        raise ConfigError(f"{where}: the run records no pre-processing {', '.join(missing)} (a run fine-tuned before "
                          "voco recorded it); fine-tune it again with this version")
    return Params(spacing=tuple(float(s) for s in preprocess["spacing"]),
                  window=tuple(float(w) for w in preprocess["window"]),
                  roi=tuple(int(r) for r in preprocess["roi"]),
                  storage_dtype=str(preprocess.get("storage_dtype", "float16")),
                  modality=tuple(preprocess.get("modality") or ("CT",)))


def prepare(image: np.ndarray, affine: np.ndarray, params: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The run's pre-processing of one image: ((C, X', Y', Z') float32 at the store's precision, geometry meta).

    The image is rounded to the store's dtype (float16 by default) exactly as ``voco preprocess`` stores it, so the
    network sees the same numbers as on a stored case.
    """
    from voco.data.preprocess import preprocess_arrays

    prep = preprocess_arrays(image, affine, {}, params)
    x = prep.image.astype(params.storage_dtype, copy=False).astype(np.float32)
    return x, prep.meta


def labels_in_original(probs: Any, meta: dict[str, Any]) -> np.ndarray:
    """Class probabilities on the stored grid -> label map on the original grid.

    Each class's probability is resampled to the original voxel grid (linear; outside the foreground crop background
    is certain), then the argmax is taken. One class at a time, so memory is two original-size float volumes.

    Args:
        probs: (K, X, Y, Z) probabilities on the stored grid (``meta["shape"]``), numpy or torch.
        meta: the case's geometry (:func:`voco.data.preprocess.preprocess_arrays`).
    Returns:
        (*meta["original_shape"]) uint8 labels.
    """
    from voco.data.store import to_original

    p = probs.numpy() if hasattr(probs, "numpy") else np.asarray(probs)
    best = to_original(p[0], meta, order=1, fill=1.0)
    labels = np.zeros(best.shape, dtype=np.uint8)
    for k in range(1, p.shape[0]):
        pk = to_original(p[k], meta, order=1, fill=0.0)
        better = pk > best
        labels[better] = k
        np.maximum(best, pk, out=best)
    return labels


def save_mask(labels: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a label map as NIfTI (uint8, or uint16 past 255 classes) with ``affine`` as qform and sform, atomically."""
    import nibabel as nib

    from voco.io import atomic_path

    dtype = np.uint8 if int(labels.max(initial=0)) <= 255 else np.uint16
    img = nib.Nifti1Image(np.asarray(labels, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def choose_device(device: str = "auto") -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible")
    return torch.device(device)


def _mask_path(out: Path, scan: Scan, single: bool) -> Path:
    if single and _nifti_name(out) is not None:
        return out
    return out / f"{scan.name}.nii.gz"


def predict(
    run_dir: str | os.PathLike[str],
    inp: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    blend: str | None = None,
    device: str = "auto",
    amp: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Segment every scan of ``inp`` with the run; write masks (and ``predict.json`` when ``out`` is a folder).

    Args:
        run_dir: a finished fine-tuning run (``run.json`` + ``model.pt``).
        inp: a NIfTI file, a folder of NIfTI files or DICOM series.
        out: a folder (``<scan>.nii.gz`` per scan + ``predict.json``), or a ``.nii.gz`` path for a single scan.
        overlap, sw_batch_size, blend: sliding-window settings (default: the run's, as evaluation used them).
        device: ``auto`` (CUDA when visible) | ``cpu`` | ``cuda[:N]``; ``amp``: bf16 / fp16 autocast on CUDA.
        progress: a bar over the windows (default: when stderr is a terminal).
    Returns:
        the report: run, settings, and one entry per scan (status ok | failed, reason, output, shapes, seconds).
    Raises:
        DataError: no scan found, or no scan could be segmented.
    """
    import torch

    from voco.data.preprocess import PREPROCESS_VERSION
    from voco.io import write_json
    from voco.runs import load_run, resize_volume

    run = load_run(run_dir)
    params = preprocess_params(run.preprocess, str(run.path / "run.json"))
    version = run.preprocess.get("version")
    if version is not None and int(version) != PREPROCESS_VERSION:
        log.warning("%s was trained on pre-processing version %s, this voco has version %d: masks may differ from "
                    "what the run saw", run.path, version, PREPROCESS_VERSION)
    inf = dict(run.meta.get("inference") or {})
    overlap = float(overlap if overlap is not None else inf.get("overlap", 0.5))
    sw = int(sw_batch_size or inf.get("sw_batch_size", 4))
    blend = str(blend or inf.get("blend", "gaussian"))
    dev = choose_device(device)
    progress = sys.stderr.isatty() if progress is None else progress
    net = run.net.to(dev)
    scans = find_scans(inp)
    out = Path(out)
    single = len(scans) == 1 and _nifti_name(out) is not None
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    log.info("predict: %d scan(s) from %s with %s (%s, %d classes) on %s, overlap %g -> %s", len(scans), inp,
             run.path, run.record.get("arch", {}).get("name"), len(run.labels), dev, overlap, out)
    entries: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for i, scan in enumerate(scans, 1):
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"name": scan.name, "input": str(scan.path), "kind": scan.kind, "status": "failed"}
        try:
            image, affine = read_scan(scan, len(params.modality))
            entry["shape"] = [int(n) for n in image.shape[1:]]
            try:
                x, meta = prepare(image, affine, params)
            except DataError as e:
                raise DataError(f"{scan.path}: {e}") from None
            del image
            if run.task == "classification":
                with torch.no_grad():
                    logits = net(resize_volume(x, run.roi)[None].to(dev)).float()
                p = torch.softmax(logits, 1)[0].cpu().numpy()
                entry.update(status="ok", **{"class": int(p.argmax()), "label": run.labels.get(int(p.argmax()))},
                             probs=[float(v) for v in p])
            else:
                from voco.eval.inference import predict_probs

                probs = predict_probs(net, x, run.roi, overlap, sw, blend, device=dev, amp=amp, progress=progress)
                labels = labels_in_original(probs, meta)
                del probs
                target = _mask_path(out, scan, single)
                save_mask(labels, affine, target)
                present = {run.labels.get(int(k), str(int(k))): int(n)
                           for k, n in zip(*np.unique(labels, return_counts=True), strict=True) if int(k) != 0}
                entry.update(status="ok", output=str(target), voxels=present)
        except (DataError, ConfigError) as e:
            entry["reason"] = str(e)
            log.error("scan %d/%d %s: %s", i, len(scans), scan.path, e)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        entries.append(entry)
        if entry["status"] == "ok":
            log.info("scan %d/%d %s: %s in %.1f s", i, len(scans), scan.name,
                     entry.get("output") or f"class {entry.get('label')}", entry["seconds"])
    n_ok = sum(e["status"] == "ok" for e in entries)
    report = {"run": str(run.path), "input": str(inp), "output": str(out), "device": str(dev), "overlap": overlap,
              "sw_batch_size": sw, "blend": blend, "preprocess": run.preprocess, "labels": run.labels,
              "n_ok": n_ok, "n_failed": len(entries) - n_ok, "seconds": round(time.perf_counter() - t_all, 3),
              "scans": entries}
    if not single:
        write_json(out / REPORT, report)
    if n_ok == 0:
        reasons = "; ".join(f"{e['name']}: {e.get('reason')}" for e in entries[:5])
        raise DataError(f"{inp}: no scan could be segmented ({reasons})")
    return report


def summarise(report: dict[str, Any]) -> Sequence[str]:
    """One line per failed scan (for the command's exit message)."""
    return [f"{e['name']}: {e.get('reason')}" for e in report["scans"] if e["status"] != "ok"]
