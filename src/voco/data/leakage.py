"""Leakage audit: is any downstream evaluation volume also in the pre-training corpus?

Two content fingerprints per case, both taken from the case's *source* image (the file the pre-processing read,
manifest column ``source_image`` or ``source``):

* ``file``: sha256 of the file's bytes (finds byte-identical copies under another name / in another dataset);
* ``voxels``: sha256 of the decoded voxel array in closest-canonical (RAS) orientation, rounded to 0.01 and stored as
  int64, together with its shape. Re-compressed copies (``.nii`` vs ``.nii.gz``, another gzip level, another integer
  dtype or scaling, an axis-flipped re-save) decode to the same voxels and are found too.

File names and case ids are deliberately not compared: identical names in unrelated datasets are common, and renamed
copies are the case that matters.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from voco.errors import DataError
from voco.io import sha256_file

log = logging.getLogger(__name__)

SOURCE_COLUMNS = ("source_image", "source")
ROUND_DECIMALS = 2


@dataclasses.dataclass(frozen=True)
class CaseRef:
    """One manifest row: where it came from and which source file it points at."""

    dataset: str
    case_id: str
    split: str
    source: str
    manifest: str


def voxel_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of the decoded, canonically oriented, rounded voxel array (+ shape) of a NIfTI / ITK image.

    Raises:
        DataError: the file cannot be decoded.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.as_closest_canonical(nib.load(str(path)))
            data = np.asarray(img.dataobj, dtype=np.float64)
        else:
            import SimpleITK as sitk

            img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAS")
            data = np.transpose(sitk.GetArrayFromImage(img).astype(np.float64))  # ITK gives z,y,x
    except Exception as e:  # noqa: BLE001 - nibabel / ITK raise many types for a bad file
        raise DataError(f"{path}: cannot decode the image for the voxel hash: {e}") from e
    q = np.rint(np.nan_to_num(data) * 10**ROUND_DECIMALS).astype(np.int64)
    h = hashlib.sha256()
    h.update(repr(tuple(q.shape)).encode())
    h.update(np.ascontiguousarray(q).tobytes())
    return h.hexdigest()


def fingerprint(path: str) -> dict[str, Any]:
    """Both fingerprints of one file; ``error`` set instead when it cannot be read."""
    try:
        return {"path": path, "file": sha256_file(path), "voxels": voxel_hash(path), "error": None}
    except (OSError, DataError) as e:
        return {"path": path, "file": None, "voxels": None, "error": str(e)}


def read_manifest(path: str | os.PathLike[str], splits: Iterable[str] | None = None) -> list[CaseRef]:
    """The ok rows of a manifest (optionally only ``splits``), with their source paths resolved.

    Relative source paths are tried against the working directory, then against the manifest's folder.

    Raises:
        DataError: the manifest is unreadable or has no source column.
    """
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read the manifest: {e}") from e
    col = next((c for c in SOURCE_COLUMNS if c in df.columns), None)
    if col is None:
        raise DataError(f"{path}: manifest has none of the source columns {SOURCE_COLUMNS}; re-run voco preprocess")
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    if splits is not None and "split" in df.columns:
        df = df[df["split"].isin(list(splits))]
    out = []
    for row in df.itertuples(index=False):
        r = row._asdict()
        src = str(r.get(col) or "")
        if not src:
            continue
        p = Path(src)
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p
        out.append(
            CaseRef(
                dataset=str(r.get("dataset", path.parent.name)),
                case_id=str(r.get("case_id", "")),
                split=str(r.get("split", "")),
                source=str(p),
                manifest=str(path),
            )
        )
    return out


def fingerprint_all(paths: Iterable[str], workers: int = 1) -> dict[str, dict[str, Any]]:
    """Fingerprint each distinct path once (in ``workers`` processes)."""
    unique = sorted(set(paths))
    if workers <= 1 or len(unique) < 2:
        results = [fingerprint(p) for p in _progress(unique)]
    else:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(_progress(pool.map(fingerprint, unique, chunksize=8), total=len(unique)))
    return {r["path"]: r for r in results}


def _progress(it, total: int | None = None):
    from tqdm import tqdm

    return tqdm(it, total=total, desc="hashing", unit="vol", mininterval=5, disable=None)


def audit(
    pretrain: list[str | os.PathLike[str]],
    downstream: list[str | os.PathLike[str]],
    splits: Iterable[str] = ("test",),
    workers: int = 1,
) -> dict[str, Any]:
    """Compare every pre-training case with every downstream case of ``splits`` by both fingerprints.

    Returns:
        the report: inputs, counts per downstream dataset, the overlaps (each with the fingerprints that matched),
        and the files that could not be read.
    """
    splits = list(splits)
    pre = [c for m in pretrain for c in read_manifest(m)]
    down = [c for m in downstream for c in read_manifest(m, splits)]
    log.info("leakage audit: %d pre-training cases vs %d downstream cases (splits %s)", len(pre), len(down), splits)
    fps = fingerprint_all([c.source for c in pre + down], workers)
    index: dict[tuple[str, str], list[CaseRef]] = {}
    for c in pre:
        fp = fps[c.source]
        for kind in ("file", "voxels"):
            if fp[kind]:
                index.setdefault((kind, fp[kind]), []).append(c)
    overlaps = []
    by_dataset: dict[str, dict[str, Any]] = {}
    for c in down:
        stats = by_dataset.setdefault(c.dataset, {"checked": 0, "overlapping": 0, "pretrain_datasets": []})
        stats["checked"] += 1
        fp = fps[c.source]
        matches: dict[tuple[str, str], dict[str, Any]] = {}
        for kind in ("file", "voxels"):
            for p in index.get((kind, fp[kind]), []) if fp[kind] else []:
                m = matches.setdefault(
                    (p.dataset, p.case_id),
                    {
                        "pretrain_dataset": p.dataset,
                        "pretrain_case": p.case_id,
                        "pretrain_source": p.source,
                        "match": [],
                    },
                )
                m["match"].append(kind)
        if matches:
            stats["overlapping"] += 1
            for m in matches.values():
                overlaps.append(
                    {
                        "downstream_dataset": c.dataset,
                        "downstream_case": c.case_id,
                        "split": c.split,
                        "downstream_source": c.source,
                        **m,
                    }
                )
                if m["pretrain_dataset"] not in stats["pretrain_datasets"]:
                    stats["pretrain_datasets"].append(m["pretrain_dataset"])
    unreadable = [{"path": p, "error": fp["error"]} for p, fp in sorted(fps.items()) if fp["error"]]
    return {
        "pretrain_manifests": [str(p) for p in pretrain],
        "downstream_manifests": [str(p) for p in downstream],
        "splits": splits,
        "n_pretrain": len(pre),
        "n_downstream": len(down),
        "n_overlapping_cases": sum(s["overlapping"] for s in by_dataset.values()),
        "by_dataset": by_dataset,
        "overlaps": overlaps,
        "unreadable": unreadable,
        "method": f"sha256 of source file bytes; sha256 of RAS voxels rounded to {ROUND_DECIMALS} decimals + shape",
    }


def to_markdown(report: dict[str, Any]) -> str:
    """A short Markdown summary: one row per downstream dataset, then the overlapping cases."""
    lines = [
        "# Leakage audit: pre-training corpus vs downstream evaluation splits",
        "",
        f"{report['n_pretrain']} pre-training cases compared with {report['n_downstream']} downstream cases "
        f"(splits: {', '.join(report['splits'])}) by {report['method']}.",
        "",
        "| downstream dataset | cases checked | overlapping | found in |",
        "| --- | ---: | ---: | --- |",
    ]
    for ds, s in sorted(report["by_dataset"].items()):
        lines.append(f"| {ds} | {s['checked']} | {s['overlapping']} | {', '.join(s['pretrain_datasets']) or '-'} |")
    if report["overlaps"]:
        lines += [
            "",
            "## Overlapping cases",
            "",
            "| downstream | case | split | pre-training | case | match |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for o in report["overlaps"]:
            lines.append(
                f"| {o['downstream_dataset']} | {o['downstream_case']} | {o['split']} | {o['pretrain_dataset']} | "
                f"{o['pretrain_case']} | {' + '.join(o['match'])} |"
            )
    else:
        lines += ["", "No overlap found."]
    if report["unreadable"]:
        lines += ["", f"{len(report['unreadable'])} source file(s) could not be read (not compared):", ""]
        lines += [f"- `{u['path']}`: {u['error']}" for u in report["unreadable"][:50]]
    return "\n".join(lines) + "\n"
