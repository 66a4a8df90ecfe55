"""The pre-processed, fast-load store: one folder per case of memory-mapped ``.npy`` arrays + a parquet manifest.

Layout (``DIR`` holds ``manifest.parquet``; paths in the manifest are relative to ``DIR``)::

    DIR/manifest.parquet
    DIR/[shard-K/]cases/<case_id>/image.npy       (X, Y, Z) (or (C, X, Y, Z)) float16 in [0, 1] (CT), RAS
                                  label.npy       (X, Y, Z) uint8 (labelled cases)
                                  label_full.npy  (X, Y, Z) uint8 (phantoms' full truth)
                                  fg.npy          (K, 3) int32 sample of label > 0 voxel positions (pos/neg crops)
                                  meta.json       geometry (see voco.data.preprocess.preprocess_arrays), key, params

Why ``.npy`` + float16 + memory map: a random crop then reads only the pages it touches and needs no decompression
(benchmarks/bench_loading.py measures it against compressed ``.npz`` and against MONAI on ``.nii.gz``).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from voco.data.geometry import from_ras, zoom_grid
from voco.errors import DataError
from voco.io import atomic_path, write_json

MANIFEST = "manifest.parquet"
#: Columns every manifest has, in this order (more may follow).
MANIFEST_COLUMNS = [
    "case_id",
    "dataset",
    "region",
    "status",
    "reason",
    "shape",
    "spacing",
    "split",
    "labelled",
    "class",
    "image",
    "label",
    "label_full",
    "meta",
    "key",
    "index",
    "n_channels",
    "original_shape",
    "original_spacing",
    "source",
]
PATH_COLUMNS = ("image", "label", "label_full", "meta")


@dataclass
class Case:
    """One pre-processed case (arrays are read-only memory maps).

    Attributes:
        case_id: the manifest's id.
        image: (X, Y, Z) float (or (C, X, Y, Z) for multi-channel), RAS, resampled, windowed.
        label: (X, Y, Z) uint8 or None.
        label_full: (X, Y, Z) uint8 or None (phantom full truth).
        meta: geometry and provenance; see :func:`to_original`.
        fg: (K, 3) int32 positions of label > 0 voxels (a sample) or None.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    label_full: np.ndarray | None
    meta: dict[str, Any]
    fg: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[-3:])  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------- writing
def case_dir(out_dir: Path, case_id: str) -> Path:
    """``out_dir/cases/<case_id>``; the id is checked (:func:`voco.ids.check_id`) and the result stays in ``out_dir``.

    Raises:
        UnsafePathError: the id is not a safe identifier.
    """
    from voco.ids import check_id, safe_join

    return safe_join(out_dir, "cases", check_id(case_id, f"{out_dir}: case id"))


def save_array(path: Path, arr: np.ndarray) -> None:
    """``np.save`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


def write_case(
    out_dir: Path,
    case_id: str,
    image: np.ndarray,
    labels: dict[str, np.ndarray],
    fg: np.ndarray | None,
    meta: dict[str, Any],
    storage_dtype: str = "float16",
) -> dict[str, str]:
    """Write one case's arrays, then its ``meta.json`` last. Returns paths relative to ``out_dir``.

    Args:
        image: (C, X, Y, Z); stored as (X, Y, Z) when C == 1.
        labels: "label" / "label_full" -> (X, Y, Z) integer arrays.
    """
    d = case_dir(out_dir, case_id)
    d.mkdir(parents=True, exist_ok=True)
    rel: dict[str, str] = {"image": "", "label": "", "label_full": ""}
    img = image[0] if image.shape[0] == 1 else image
    save_array(d / "image.npy", img.astype(storage_dtype, copy=False))
    rel["image"] = os.path.relpath(d / "image.npy", out_dir)
    for name in ("label", "label_full"):
        p = d / f"{name}.npy"
        if name in labels:
            save_array(p, labels[name])
            rel[name] = os.path.relpath(p, out_dir)
        elif p.exists():
            p.unlink()
    if fg is not None:
        save_array(d / "fg.npy", fg)
    elif (d / "fg.npy").exists():
        (d / "fg.npy").unlink()
    write_json(d / "meta.json", meta)
    rel["meta"] = os.path.relpath(d / "meta.json", out_dir)
    return rel


def write_manifest(rows: list[dict[str, Any]] | pd.DataFrame, path: Path) -> pd.DataFrame:
    """Write a manifest parquet atomically; columns in MANIFEST_COLUMNS order first."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=object)
    df = df[MANIFEST_COLUMNS + [c for c in df.columns if c not in MANIFEST_COLUMNS]]
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return df


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run `voco preprocess` / `voco merge-manifest` first)")
    try:
        return pd.read_parquet(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet manifest ({type(e).__name__}: {e})") from None


def merge_manifests(inputs: list[str | os.PathLike[str]], out: str | os.PathLike[str]) -> pd.DataFrame:
    """Concatenate shard manifests into ``out``, rewriting paths relative to ``out``'s folder.

    Rows are ordered by their dataset.json position (``index``), so the merge equals an unsharded run's manifest.

    Raises:
        DataError: an input is missing/unreadable, or a case id appears more than once (names the ids and files).
    """
    out = Path(out)
    frames = []
    origin: dict[str, str] = {}
    dups: list[str] = []
    for p in inputs:
        p = Path(p)
        df = read_manifest(p).copy()
        for cid in df["case_id"].astype(str):
            if cid in origin:
                dups.append(f"{cid} ({origin[cid]} and {p})")
            else:
                origin[cid] = str(p)
        for col in PATH_COLUMNS:
            if col in df.columns:
                df[col] = [
                    os.path.relpath((p.parent / v).resolve(), out.parent.resolve()) if isinstance(v, str) and v else ""
                    for v in df[col]
                ]
        frames.append(df)
    if dups:
        shown = "; ".join(dups[:5]) + (f"; ... {len(dups) - 5} more" if len(dups) > 5 else "")
        raise DataError(f"merge-manifest {out}: duplicate case id(s): {shown}")
    if not frames:
        raise DataError(f"merge-manifest {out}: no input manifests")
    merged = pd.concat(frames, ignore_index=True)
    if "index" in merged.columns and merged["index"].notna().all():
        merged = merged.sort_values("index", kind="stable").reset_index(drop=True)
    return write_manifest(merged, out)


# ------------------------------------------------------------------------------------------------------- reading
class Store:
    """Read access to a pre-processed dataset folder (the one holding ``manifest.parquet``).

    Example::

        store = Store("data/prep/phantom_src_a")
        for cid in store.ids(split="train", labelled=True):
            case = store.load(cid)          # memory-mapped; slicing reads only what it touches
            crop = case.image[10:42, 5:37, 0:32]
    """

    def __init__(self, root: str | os.PathLike[str], cache_size: int = 32):
        self.root = Path(root)
        self.manifest = read_manifest(self.root / MANIFEST)
        ok = self.manifest[self.manifest["status"] == "ok"]
        self._rows = {str(r["case_id"]): r for r in ok.to_dict("records")}
        self._cache: OrderedDict[str, Case] = OrderedDict()
        self._cache_size = cache_size

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: do not pickle open memory maps
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._rows

    @property
    def dataset(self) -> str:
        vals = self.manifest["dataset"].dropna().unique()
        return str(vals[0]) if len(vals) else self.root.name

    def ids(self, split: str | None = None, labelled: bool | None = None) -> list[str]:
        """Ids of the ``ok`` cases (manifest order), optionally filtered by split and labelled-ness."""
        out = []
        for cid, r in self._rows.items():
            if split is not None and r["split"] != split:
                continue
            if labelled is not None and bool(r["labelled"]) != labelled:
                continue
            out.append(cid)
        return out

    def row(self, case_id: str) -> dict[str, Any]:
        try:
            return self._rows[case_id]
        except KeyError:
            raise DataError(f"{self.root}: no ok case {case_id!r} in the manifest") from None

    def region(self, case_id: str) -> str:
        return str(self.row(case_id)["region"])

    def path(self, case_id: str, column: str = "image") -> Path | None:
        rel = self.row(case_id)[column]
        return self.root / rel if rel else None

    def load(self, case_id: str) -> Case:
        """The case's arrays (read-only memory maps) and meta."""
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            return self._cache[case_id]
        r = self.row(case_id)
        meta_path = self.root / r["meta"]
        try:
            meta = json.loads(meta_path.read_text())
            image = np.load(self.root / r["image"], mmap_mode="r")
            label = np.load(self.root / r["label"], mmap_mode="r") if r["label"] else None
            label_full = np.load(self.root / r["label_full"], mmap_mode="r") if r["label_full"] else None
            fg_path = meta_path.parent / "fg.npy"
            fg = np.load(fg_path) if fg_path.exists() else None
        except (OSError, ValueError) as e:
            raise DataError(
                f"{self.root}: case {case_id}: cannot read stored arrays ({e}); re-run voco preprocess"
            ) from e
        case = Case(case_id, image, label, label_full, meta, fg)
        self._cache[case_id] = case
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return case


# ----------------------------------------------------------------------------------------------------- geometry
def to_original(array: np.ndarray, meta: dict[str, Any], order: int = 0, fill: float = 0) -> np.ndarray:
    """Map an array on a stored case's grid back to the original image's grid (voxel order, shape, spacing).

    Undoes, in reverse: the ROI padding, the foreground crop (outside the crop is ``fill``), the resampling (nearest
    for ``order=0``, linear for ``order=1``) and the RAS reorientation.

    Args:
        array: (..., X, Y, Z) on the stored grid (``meta["shape"]``); leading axes (classes) are kept.
        meta: the case's meta (``Case.meta``).
        order: interpolation order (0 for label maps, 1 for probabilities / images).
        fill: value outside the foreground crop.
    Returns:
        (..., *meta["original_shape"]) array on the original image's voxel grid (its affine is
        ``meta["original_affine"]``).
    """
    arr = np.asarray(array)
    shape = tuple(meta["shape"])
    if tuple(arr.shape[-3:]) != shape:
        raise DataError(f"to_original: array shape {arr.shape[-3:]} does not match the stored case shape {shape}")
    if order > 0 and arr.dtype.kind not in "f":
        arr = arr.astype(np.float32)
    start, stop = np.asarray(meta["crop_start"]), np.asarray(meta["crop_stop"])
    pb = np.asarray(meta["pad_before"])
    size = stop - start
    inner = arr[(..., *(slice(int(b), int(b + n)) for b, n in zip(pb, size, strict=True)))]
    full = np.full((*arr.shape[:-3], *meta["resampled_shape"]), fill, dtype=arr.dtype)
    full[(..., *(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True)))] = inner
    scale = np.asarray(meta["scale"], dtype=np.float64)
    ras = zoom_grid(full, 1.0 / scale, tuple(meta["ras_shape"]), order=order)
    return from_ras(ras, np.asarray(meta["original_affine"]))
