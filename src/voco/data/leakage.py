"""Leakage audit: is any downstream evaluation volume also in the pre-training corpus?

"Evaluation volume" means every case that evaluation scores: the manifest's ``test`` split and, for datasets whose
test cases carry no labels (BTCV-like), the validation part carved out of training. Both come from
:func:`voco.train.finetune.split_cases` (the very function fine-tuning and evaluation use), so the audit always sees
what will be scored (``splits=("eval",)``, the default). Other splits can be named explicitly (``train``, ``test``).

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


EVAL = "eval"


def eval_refs(manifest: str | os.PathLike[str], card: dict) -> list[CaseRef]:
    """The cases evaluation scores for one downstream store: ``split_cases``' test ids (split ``test``) and, where
    there are none, its validation carve-out of training (split ``val``).

    Raises:
        DataError: the store has no usable cases (the same error fine-tuning would raise).
    """
    from voco.data.store import Store
    from voco.train.finetune import split_cases

    manifest = Path(manifest)
    refs = {c.case_id: c for c in read_manifest(manifest)}
    splits = split_cases(Store(manifest.parent), card)
    out = [dataclasses.replace(refs[c], split="test") for c in splits.test if c in refs]
    out += [dataclasses.replace(refs[c], split="val") for c in splits.val if c in refs]
    return out


def downstream_refs(
    manifest: str | os.PathLike[str], splits: Iterable[str], cards: dict[str, dict] | None = None
) -> tuple[list[CaseRef], list[str]]:
    """The downstream cases to audit from one manifest, and notes on how they were chosen.

    ``eval`` in ``splits``: what evaluation scores (:func:`eval_refs`, needs the dataset's card in ``cards``; without
    one the ``test`` split is audited and a note says so). Other names: those manifest splits.
    """
    splits = list(splits)
    notes: list[str] = []
    out: list[CaseRef] = []
    plain = [s for s in splits if s != EVAL]
    if EVAL in splits:
        allrefs = read_manifest(manifest)
        dataset = allrefs[0].dataset if allrefs else Path(manifest).parent.name
        card = (cards or {}).get(dataset)
        if card is None:
            notes.append(f"{dataset}: no dataset card given: audited its test split only (not a validation carve-out)")
            plain = list(dict.fromkeys([*plain, "test"]))
        else:
            try:
                out += eval_refs(manifest, card)
            except DataError as e:  # fine-tuning will fail on the same problem; the audit still checks the test split
                notes.append(f"{dataset}: {e}; audited its test split only")
                plain = list(dict.fromkeys([*plain, "test"]))
    if plain:
        seen = {(c.case_id, c.split) for c in out}
        out += [c for c in read_manifest(manifest, plain) if (c.case_id, c.split) not in seen]
    return out, notes


INDEX_COLUMNS = ["dataset", "case_id", "split", "source", "manifest", "file", "voxels", "error"]


def build_index(pretrain: list[str | os.PathLike[str]], workers: int = 1) -> Any:
    """Fingerprints of every pre-training case, once (a DataFrame with :data:`INDEX_COLUMNS`).

    Per-dataset audits read it instead of hashing the whole corpus again for every downstream dataset.
    """
    import pandas as pd

    pre = [c for m in pretrain for c in read_manifest(m)]
    fps = fingerprint_all([c.source for c in pre], workers)
    rows = [{**dataclasses.asdict(c), **{k: fps[c.source][k] for k in ("file", "voxels", "error")}} for c in pre]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def write_index(df: Any, path: str | os.PathLike[str]) -> None:
    from voco.io import atomic_path

    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_index(path: str | os.PathLike[str]) -> tuple[list[CaseRef], dict[str, dict[str, Any]], list[str]]:
    """(pre-training cases, their fingerprints by source, the manifests the index was built from)."""
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read the leakage index ({type(e).__name__}: {e}); rebuild it") from e
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a leakage index (missing columns {missing}); rebuild it")
    refs, fps = [], {}
    for r in df.to_dict("records"):
        refs.append(CaseRef(r["dataset"], r["case_id"], r["split"], r["source"], r["manifest"]))
        fps[r["source"]] = {"path": r["source"], **{k: _str_or_none(r[k]) for k in ("file", "voxels", "error")}}
    return refs, fps, sorted(set(df["manifest"]))


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def audit(
    pretrain: list[str | os.PathLike[str]],
    downstream: list[str | os.PathLike[str]],
    splits: Iterable[str] = (EVAL,),
    workers: int = 1,
    cards: dict[str, dict] | None = None,
    index: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Compare every pre-training case with every downstream case that evaluation scores, by both fingerprints.

    Args:
        pretrain: pre-training manifests (ignored when ``index`` is given).
        downstream: downstream manifests.
        splits: ``eval`` (default: what evaluation scores, see :func:`downstream_refs`) and / or manifest splits.
        cards: dataset id -> card, for the ``eval`` splits.
        index: a pre-training fingerprint index (:func:`build_index`) to use instead of hashing ``pretrain``.
    Returns:
        the report: inputs, counts per downstream dataset (and per split), the overlaps (each with the fingerprints
        that matched), the files that could not be read, and notes.
    """
    splits = list(splits)
    notes: list[str] = []
    if index is not None:
        pre, pre_fps, pretrain = read_index(index)
    else:
        pre, pre_fps = [c for m in pretrain for c in read_manifest(m)], {}
    down: list[CaseRef] = []
    for m in downstream:
        refs, n = downstream_refs(m, splits, cards)
        down += refs
        notes += n
    log.info("leakage audit: %d pre-training cases vs %d downstream cases (splits %s)", len(pre), len(down), splits)
    todo = [c.source for c in (down if index is not None else pre + down)]
    fps = {**pre_fps, **fingerprint_all(todo, workers)}
    index: dict[tuple[str, str], list[CaseRef]] = {}
    for c in pre:
        fp = fps[c.source]
        for kind in ("file", "voxels"):
            if fp[kind]:
                index.setdefault((kind, fp[kind]), []).append(c)
    overlaps = []
    by_dataset: dict[str, dict[str, Any]] = {}
    for c in down:
        stats = by_dataset.setdefault(
            c.dataset, {"checked": 0, "overlapping": 0, "pretrain_datasets": [], "splits": {}}
        )
        stats["checked"] += 1
        stats["splits"][c.split] = stats["splits"].get(c.split, 0) + 1
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
        "notes": notes,
        "method": f"sha256 of source file bytes; sha256 of RAS voxels rounded to {ROUND_DECIMALS} decimals + shape",
    }


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from per-dataset reports (same pre-training corpus)."""
    out: dict[str, Any] = {
        "pretrain_manifests": sorted({m for r in reports for m in r["pretrain_manifests"]}),
        "downstream_manifests": [m for r in reports for m in r["downstream_manifests"]],
        "splits": sorted({s for r in reports for s in r["splits"]}),
        "n_pretrain": max((r["n_pretrain"] for r in reports), default=0),
        "n_downstream": sum(r["n_downstream"] for r in reports),
        "n_overlapping_cases": sum(r["n_overlapping_cases"] for r in reports),
        "by_dataset": {k: v for r in reports for k, v in r["by_dataset"].items()},
        "overlaps": [o for r in reports for o in r["overlaps"]],
        "unreadable": [u for r in reports for u in r["unreadable"]],
        "notes": [n for r in reports for n in r.get("notes", [])],
        "method": reports[0]["method"] if reports else "",
    }
    return out


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
    if report.get("notes"):
        lines += ["", *[f"Note: {n}" for n in report["notes"]]]
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
