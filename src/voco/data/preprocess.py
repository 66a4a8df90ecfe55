"""Pre-processing (SPEC 1): RAS, resample, intensity window, foreground crop, pad; validation of each case.

The pipeline for one case::

    read + validate  ->  reorient to RAS  ->  resample to the target spacing (image linear, labels nearest)
    ->  intensity (CT: clip to the HU window, scale to [0, 1]; other modalities: percentile clip + z-score on
        non-zero voxels)  ->  crop to the foreground bounding box  ->  pad up to the ROI  ->  store

Every problem with one case raises :class:`voco.errors.DataError` naming the file and the problem; the caller turns it
into a ``rejected`` manifest row and goes on with the other cases.

Geometry conventions: arrays are indexed (X, Y, Z) in voxel order of their affine; resampling keeps the world
position of voxel (0, 0, 0) (the affine's origin) and scales the affine's columns, so ``new_affine = affine @
diag(s, 1)`` with ``s = new_spacing / old_spacing``; output voxel ``j`` samples input position ``j * s``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from voco.data.geometry import from_ras, resampled_shape, to_ras, voxel_spacing, zoom_grid  # noqa: F401 - re-exported
from voco.errors import DataError, UnsafePathError

log = logging.getLogger(__name__)

#: Bump when the pipeline's output changes for the same inputs and parameters (part of every cache key).
PREPROCESS_VERSION = 1
#: Number of label-foreground voxel positions kept per case for positive crop sampling.
FG_SAMPLES = 4096
#: Image and label affines may differ by this much (mm) before the pair is rejected.
AFFINE_TOL_MM = 1e-3
CT_MODALITIES = {"CT", "CTA", "PET-CT"}


@dataclass(frozen=True)
class Params:
    """Every parameter that changes the output (all of it goes into the cache key).

    Attributes:
        spacing: target voxel spacing (mm), x, y, z.
        window: HU window [low, high] for CT channels.
        roi: pad every volume to at least this size (voxels).
        storage_dtype: dtype of stored images (float16 | float32).
        modality: one modality name per channel (``("CT",)`` for plain CT).
    """

    spacing: tuple[float, float, float]
    window: tuple[float, float]
    roi: tuple[int, int, int]
    storage_dtype: str = "float16"
    modality: tuple[str, ...] = ("CT",)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_region_params(cls, p: dict, modality: dict[int, str] | None = None) -> Params:
        """From :func:`voco.config.region_params` output (+ the dataset's modality map)."""
        mod = tuple(str(modality[k]) for k in sorted(modality)) if modality else ("CT",)
        return cls(
            spacing=tuple(float(s) for s in p["spacing"]),  # type: ignore[arg-type]
            window=tuple(float(w) for w in p["window"]),  # type: ignore[arg-type]
            roi=tuple(int(r) for r in p["roi"]),  # type: ignore[arg-type]
            storage_dtype=str(p.get("storage_dtype", "float16")),
            modality=mod,
        )


@dataclass
class Prepared:
    """One pre-processed case.

    Attributes:
        image: (C, X, Y, Z) float32.
        labels: name ("label" / "label_full") -> (X, Y, Z) integer array.
        meta: geometry and provenance (see :func:`preprocess_arrays`).
    """

    image: np.ndarray
    labels: dict[str, np.ndarray]
    meta: dict[str, Any]


# --------------------------------------------------------------------------------------------------------- reading
def load_nifti(path: Path, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file's data and affine, turning every failure into a DataError that names the file.

    Returns:
        (data as stored, scaled by the header's slope/intercept if any; affine (4, 4) float64)
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path}: file not found")
    if path.is_dir():
        raise DataError(f"{what} {path}: is a directory, not a NIfTI file")
    if path.stat().st_size == 0:
        raise DataError(f"{what} {path}: empty file (0 bytes)")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for garbage input
        raise DataError(f"{what} {path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{what} {path}: not a NIfTI file (nibabel reads it as {type(img).__name__})")
    check_voxel_type(img.get_data_dtype(), path, what)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # EOFError, zlib.error, ValueError ... on truncated files
        raise DataError(f"{what} {path}: truncated or corrupt data ({type(e).__name__}: {e})") from None
    check_voxel_type(data.dtype, path, what)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{what} {path}: invalid affine (singular or not finite)")
    return data, affine


def check_voxel_type(dtype: np.dtype, path: Path, what: str) -> None:
    """Reject voxel types that are not one real number per voxel (they would be silently mangled downstream).

    Raises:
        DataError: structured voxels (RGB / RGBA colour, vector records), complex values, or non-numeric data.
    """
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.kind == "V":
        names = ",".join(dtype.names or ()) or str(dtype)
        raise DataError(
            f"{what} {path}: structured voxels ({names}: RGB/RGBA colour or vector data, dtype {dtype}); a scalar "
            "intensity volume is needed (convert colour images to one channel, or list channels as separate files)"
        )
    if dtype.kind == "c":
        raise DataError(
            f"{what} {path}: complex-valued voxels (dtype {dtype}); a real intensity volume is needed (save the "
            "magnitude, np.abs(data), if that is what the scan means: the imaginary part is never dropped silently)"
        )
    if dtype.kind not in "biuf":
        raise DataError(f"{what} {path}: non-numeric voxels (dtype {dtype}); a numeric intensity volume is needed")


def _spatial3(data: np.ndarray, path: Path, what: str, n_channels: int) -> np.ndarray:
    """Check dimensionality; return (X, Y, Z) or (X, Y, Z, C) with C == n_channels > 1."""
    shape = tuple(data.shape)
    if data.ndim == 4 and shape[3] == 1:
        data = data[..., 0]
    if data.ndim < 3 or (data.ndim == 3 and min(shape) < 2):
        raise DataError(f"{what} {path}: 2-D data (shape {shape}); a 3-D volume is needed")
    if data.ndim == 4:
        if what == "image" and n_channels > 1 and shape[3] == n_channels:
            if min(shape[:3]) < 2:
                raise DataError(f"{what} {path}: 2-D data per channel (shape {shape})")
            return data
        if what != "image":
            raise DataError(f"{what} {path}: 4-D data (shape {shape}); a label must be one 3-D volume")
        raise DataError(
            f"{what} {path}: 4-D data (shape {shape}) with {shape[3]} volumes, but the modality map lists "
            f"{n_channels} channel(s); only multi-channel images with one volume per listed modality are accepted"
        )
    if data.ndim > 4:
        raise DataError(f"{what} {path}: {data.ndim}-D data (shape {shape}); a 3-D volume is needed")
    return data


def read_image(paths: tuple[Path, ...], n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one case's image (one file, or one file per channel). Returns ((C, X, Y, Z) float32, affine)."""
    if len(paths) > 1 and len(paths) != n_channels:
        raise DataError(f"image {paths[0]}: {len(paths)} channel files but the modality map lists {n_channels}")
    chans: list[np.ndarray] = []
    affine0: np.ndarray | None = None
    for p in paths:
        data, affine = load_nifti(p, "image")
        data = _spatial3(data, p, "image", n_channels if len(paths) == 1 else 1)
        if data.ndim == 3 and len(paths) == 1 and n_channels > 1:
            raise DataError(f"image {p}: 3-D image but the modality map lists {n_channels} channels")
        arr = np.asarray(data, dtype=np.float32)
        arr = np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[None]
        if affine0 is None:
            affine0 = affine
        else:
            if arr.shape[1:] != chans[0].shape[1:]:
                raise DataError(
                    f"image {p}: channel shape {arr.shape[1:]} differs from {paths[0]} {chans[0].shape[1:]}"
                )
            if not np.allclose(affine, affine0, atol=AFFINE_TOL_MM):
                raise DataError(f"image {p}: channel affine differs from {paths[0]}")
        chans.append(arr)
    image = np.concatenate(chans, 0) if len(chans) > 1 else chans[0]
    bad = ~np.isfinite(image)
    if bad.any():
        n_nan = int(np.isnan(image).sum())
        raise DataError(
            f"image {paths[0]}: contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite voxel(s) of {image.size}"
        )
    assert affine0 is not None
    return image, affine0


def read_label(
    path: Path, image_shape: tuple[int, ...], image_affine: np.ndarray, label_map: dict[int, str], what: str
) -> np.ndarray:
    """Read a label volume and check it against the image and the label map. Returns (X, Y, Z) int array."""
    data, affine = load_nifti(path, what)
    data = _spatial3(data, path, what, 1)
    if tuple(data.shape) != tuple(image_shape):
        raise DataError(f"{what} {path}: shape {tuple(data.shape)} does not match the image shape {tuple(image_shape)}")
    diff = float(np.abs(affine - image_affine).max())
    if diff > AFFINE_TOL_MM:
        raise DataError(
            f"{what} {path}: affine does not match the image affine (max difference {diff:.4g} mm); "
            f"label and image must be on the same grid"
        )
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise DataError(f"{what} {path}: contains NaN or infinite values")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise DataError(f"{what} {path}: non-integer label values (a label volume must hold class indices)")
        data = rounded
    data = np.asarray(data)
    if data.dtype.kind in "iu" and data.size and 0 <= int(data.min()) and int(data.max()) < 65536:
        values = np.flatnonzero(np.bincount(data.ravel()))  # much faster than np.unique on big volumes
    else:
        values = np.unique(data)
    if values.size and values.min() < 0:
        raise DataError(f"{what} {path}: negative label values {values[values < 0][:10].tolist()}")
    if label_map:
        unknown = sorted(set(int(v) for v in values) - set(label_map))
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise DataError(
                f"{what} {path}: label values {shown} are not in the dataset's label map "
                f"(known: {', '.join(map(str, sorted(label_map)))})"
            )
    dtype = np.uint8 if (values.size == 0 or values.max() <= 255) else np.uint16
    return np.asarray(data).astype(dtype)


# ------------------------------------------------------------------------------------------------------- intensity
def ct_window(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to [low, high] HU and scale to [0, 1] (in place on float arrays)."""
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise DataError(f"invalid window {window}: high must exceed low")
    np.clip(x, lo, hi, out=x)
    x -= lo
    x /= hi - lo
    return x


def mr_normalise(x: np.ndarray) -> np.ndarray:
    """Clip non-zero voxels at their 0.5th / 99.5th percentile, then z-score them; zeros stay zero (in place)."""
    nz = x != 0
    if not nz.any():
        return x
    vals = x[nz]
    lo, hi = np.percentile(vals, [0.5, 99.5])
    vals = np.clip(vals, lo, hi)
    std = float(vals.std())
    x[nz] = (vals - float(vals.mean())) / (std if std > 0 else 1.0)
    return x


def foreground_box(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Bounding box (start, stop) of the True voxels of a (X, Y, Z) mask."""
    start, stop = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        start.append(int(idx[0]))
        stop.append(int(idx[-1]) + 1)
    return tuple(start), tuple(stop)  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------------------- pipeline
def preprocess_arrays(image: np.ndarray, affine: np.ndarray, labels: dict[str, np.ndarray], params: Params) -> Prepared:
    """Run the pipeline on arrays already read and validated.

    Args:
        image: (C, X, Y, Z) float32 in the file's voxel order.
        affine: (4, 4) voxel -> world (mm, RAS+ world as in NIfTI).
        labels: name -> (X, Y, Z) integer arrays on the image grid.
        params: target spacing, window, ROI, modality per channel.
    Returns:
        Prepared with image (C, X', Y', Z') float32, labels on the same grid, and ``meta`` holding: ``affine``
        (of the stored grid), ``spacing``, ``original_shape``, ``original_affine``, ``original_spacing``,
        ``ras_shape``, ``scale``, ``resampled_shape``/``resampled_affine`` (before cropping), ``crop_start``/``crop_stop`` (in the resampled RAS grid),
        ``pad_before``/``pad_after``, ``shape``.
    Raises:
        DataError: no foreground (every voxel at or below the window's low end / zero).
    """
    if image.shape[0] != len(params.modality):
        raise DataError(f"image has {image.shape[0]} channel(s) but the modality map lists {len(params.modality)}")
    original_shape = tuple(int(n) for n in image.shape[1:])
    original_affine = np.asarray(affine, dtype=np.float64)
    image, ras_affine = to_ras(image, original_affine)
    labels = {k: to_ras(v, original_affine)[0] for k, v in labels.items()}
    ras_shape = tuple(int(n) for n in image.shape[1:])

    spacing = voxel_spacing(ras_affine)
    target = np.asarray(params.spacing, dtype=np.float64)
    out_shape = resampled_shape(ras_shape, spacing, target)
    scale = target / spacing
    if np.allclose(spacing, target, rtol=1e-4, atol=1e-5):
        out_shape, scale, res_affine = ras_shape, np.ones(3), ras_affine.copy()
    else:
        res_affine = ras_affine.copy()
        res_affine[:3, :3] = ras_affine[:3, :3] * scale[None, :]
    image = zoom_grid(np.ascontiguousarray(image, dtype=np.float32), scale, out_shape, order=1)
    labels = {k: zoom_grid(np.ascontiguousarray(v), scale, out_shape, order=0) for k, v in labels.items()}

    image = np.array(image, dtype=np.float32, copy=True)  # the intensity steps work in place
    fg = np.zeros(out_shape, dtype=bool)
    for c, mod in enumerate(params.modality):
        if mod.upper() in CT_MODALITIES:
            ct_window(image[c], params.window)
            fg |= image[c] > 0
        else:
            fg |= image[c] != 0
            mr_normalise(image[c])
    if not fg.any():
        what = (
            f"at or below the window's low end ({params.window[0]:g} HU)"
            if params.modality[0].upper() in CT_MODALITIES
            else "zero"
        )
        raise DataError(f"no foreground: every voxel is {what} after resampling")
    start, stop = foreground_box(fg)
    sl = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    image = image[(slice(None), *sl)]
    labels = {k: v[sl] for k, v in labels.items()}

    crop_shape = image.shape[1:]
    pad_before = [max(0, r - n) // 2 for n, r in zip(crop_shape, params.roi, strict=True)]
    pad_after = [max(0, r - n) - b for n, r, b in zip(crop_shape, params.roi, pad_before, strict=True)]
    if any(pad_before) or any(pad_after):
        widths = list(zip(pad_before, pad_after, strict=True))
        image = np.pad(image, [(0, 0), *widths], mode="constant", constant_values=0)
        labels = {k: np.pad(v, widths, mode="constant", constant_values=0) for k, v in labels.items()}

    shift = np.eye(4)
    shift[:3, 3] = np.asarray(start) - np.asarray(pad_before)
    meta = {
        "shape": [int(n) for n in image.shape[1:]],
        "n_channels": int(image.shape[0]),
        "spacing": [float(s) for s in target],
        "affine": (res_affine @ shift).tolist(),
        "original_shape": list(original_shape),
        "original_affine": original_affine.tolist(),
        "original_spacing": [float(s) for s in voxel_spacing(original_affine)],
        "ras_shape": list(ras_shape),
        "scale": [float(s) for s in scale],
        "resampled_shape": [int(n) for n in out_shape],
        "resampled_affine": res_affine.tolist(),
        "crop_start": list(start),
        "crop_stop": list(stop),
        "pad_before": pad_before,
        "pad_after": pad_after,
    }
    return Prepared(np.ascontiguousarray(image), {k: np.ascontiguousarray(v) for k, v in labels.items()}, meta)


def foreground_locations(label: np.ndarray, n: int = FG_SAMPLES, seed: int = 0) -> np.ndarray:
    """Up to ``n`` random (x, y, z) positions of label > 0 voxels, (K, 3) int32 (for positive crop sampling)."""
    idx = np.flatnonzero(label.ravel() > 0)
    if idx.size > n:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    return np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int32)


# ---------------------------------------------------------------------------------------------- dataset driver
def case_key(entry: Any, params: Params, context: dict[str, Any]) -> str:
    """Cache key: sha256 of every input file + every parameter + the pipeline version + the label maps."""
    from voco.io import sha256_file, stable_hash

    files = [sha256_file(p) for p in entry.images]
    files += [sha256_file(p) if p is not None else None for p in (entry.label, entry.label_full)]
    return stable_hash({"version": PREPROCESS_VERSION, "files": files, "params": params.to_dict(), **context}, n=20)


def _check_inputs_exist(entry: Any) -> None:
    for what, p in [("image", p) for p in entry.images] + [("label", entry.label), ("label_full", entry.label_full)]:
        if p is None:
            continue
        if not Path(p).exists():
            raise DataError(f"{what} {p}: file not found")
        if Path(p).stat().st_size == 0:
            raise DataError(f"{what} {p}: empty file (0 bytes)")


def process_entry(
    entry: Any,
    out_dir: Path,
    params: Params,
    dataset: str,
    region: str,
    labels: dict[int, str],
    labels_full: dict[int, str],
) -> dict[str, Any]:
    """Pre-process one dataset.json entry into ``out_dir``; a bad case never raises (it returns a rejected row).

    Returns:
        the manifest row (paths relative to ``out_dir``), with ``cached`` True when the stored result was reused.
    """
    from voco.data.store import case_dir, write_case
    from voco.io import read_json

    row = rejected_row(
        entry.case_id, "", dataset, region, params, entry.index, entry.split, str(entry.images[0]),
        labelled=entry.label is not None, cls=int(entry.cls),
    )
    if entry.problem:  # an unsafe case id: nothing on disk may be named after it
        row["reason"] = f"UnsafePathError: {entry.problem}"
        return row
    try:
        d = case_dir(out_dir, entry.case_id)
    except DataError as e:
        row["reason"] = f"{type(e).__name__}: {e}"
        return row
    meta_path = d / "meta.json"
    try:
        # Reading and computing: any failure here is this case's verdict (rejected with the reason), never the job's.
        _check_inputs_exist(entry)
        key = case_key(entry, params, {"region": region, "labels": labels, "labels_full": labels_full})
        row["key"] = key
        if meta_path.is_file():
            try:
                old = read_json(meta_path)
            except (OSError, ValueError):
                old = {}
            if old.get("key") == key and all((out_dir / p).is_file() for p in old.get("files", {}).values() if p):
                # The cache holds what the arrays' key covers (shape, geometry, paths); what the dataset.json says about
                # the case (split, class, position, label presence, source) always comes from the current entry.
                row.update({k: v for k, v in old["row"].items() if k in CACHED_COLUMNS})
                row["cached"] = True
                return row
        image, affine = read_image(entry.images, len(params.modality))
        lab: dict[str, np.ndarray] = {}
        if entry.label is not None:
            lab["label"] = read_label(entry.label, image.shape[1:], affine, labels, "label")
        if entry.label_full is not None:
            lab["label_full"] = read_label(entry.label_full, image.shape[1:], affine, labels_full, "label_full")
        try:
            prep = preprocess_arrays(image, affine, lab, params)
        except DataError as e:
            raise DataError(f"image {entry.images[0]}: {e}") from None
        del image
        fg = foreground_locations(prep.labels["label"], seed=int(key[:8], 16)) if "label" in prep.labels else None
    except Exception as e:  # noqa: BLE001 - one case, one verdict: whatever a bad file raises rejects this case only
        row["reason"] = case_reason(e, entry)
        _remove_case(d, out_dir)  # no stale arrays for a case that is now rejected
        return row
    meta = dict(prep.meta)
    meta.update(
        case_id=entry.case_id,
        dataset=dataset,
        region=region,
        key=key,
        params=params.to_dict(),
        labels={str(k): v for k, v in labels.items()},
        labels_full={str(k): v for k, v in labels_full.items()},
        window=list(params.window),
        source=[str(p) for p in entry.images],
        version=PREPROCESS_VERSION,
    )
    row.update(
        status="ok",
        shape=meta["shape"],
        original_shape=meta["original_shape"],
        original_spacing=meta["original_spacing"],
        n_channels=meta["n_channels"],
    )
    # write_case writes meta.json last: fill in what it will contain first.
    rel = {
        "image": os.path.relpath(d / "image.npy", out_dir),
        "label": os.path.relpath(d / "label.npy", out_dir) if "label" in prep.labels else "",
        "label_full": os.path.relpath(d / "label_full.npy", out_dir) if "label_full" in prep.labels else "",
        "meta": os.path.relpath(meta_path, out_dir),
    }
    row.update(rel)
    meta["files"] = {k: v for k, v in rel.items() if k != "meta"}
    meta["row"] = {k: v for k, v in row.items() if k in CACHED_COLUMNS}
    # Writing: a failure here (disk full, unwritable output) is the job's problem and stops it.
    try:
        written = write_case(out_dir, entry.case_id, prep.image, prep.labels, fg, meta, params.storage_dtype)
    except BaseException:
        _remove_case(d, out_dir)
        raise
    assert written == rel, (written, rel)
    return row


def rejected_row(
    case_id: str,
    reason: str,
    dataset: str,
    region: str,
    params: Params,
    index: int,
    split: str = "",
    source: str = "",
    labelled: bool = False,
    cls: int = -1,
) -> dict[str, Any]:
    """A manifest row for a case that ends ``rejected`` with ``reason`` (the starting point of every row)."""
    return {
        "case_id": case_id,
        "dataset": dataset,
        "region": region,
        "status": "rejected",
        "reason": reason,
        "shape": [],
        "spacing": list(params.spacing),
        "split": split,
        "labelled": labelled,
        "class": int(cls),
        "image": "",
        "label": "",
        "label_full": "",
        "meta": "",
        "key": "",
        "index": int(index),
        "n_channels": len(params.modality),
        "original_shape": [],
        "original_spacing": [],
        "source": source,
        "cached": False,
    }


#: Manifest columns restored from the cache: everything the arrays' cache key determines. The rest (case id, split,
#: class, index, labelled, source, dataset, region) is taken from the current dataset.json entry on every run.
CACHED_COLUMNS = (
    "status",
    "reason",
    "shape",
    "spacing",
    "image",
    "label",
    "label_full",
    "meta",
    "key",
    "n_channels",
    "original_shape",
    "original_spacing",
)


def case_reason(e: BaseException, entry: Any) -> str:
    """A rejected case's reason: the exception's type and message, and the file it was reading when not named."""
    msg = str(e) or repr(e)
    files = [str(p) for p in (*entry.images, entry.label, entry.label_full) if p is not None]
    if not any(f in msg for f in files):
        msg += f" (case {entry.case_id}: image {entry.images[0]}" + (f", label {entry.label}" if entry.label else "")
        msg += ")"
    return f"{type(e).__name__}: {msg}"


def _remove_case(d: Path, out_dir: Path) -> None:
    """Delete a case folder, only ever inside ``out_dir`` (asserted on the resolved paths)."""
    import shutil

    from voco.ids import is_inside

    if d.is_symlink() or not d.exists():
        if d.is_symlink():
            d.unlink()
        return
    if not is_inside(d, Path(out_dir) / "cases") or Path(d).resolve() == (Path(out_dir) / "cases").resolve():
        raise UnsafePathError(f"refusing to delete {d}: not a case folder inside {Path(out_dir) / 'cases'}")
    shutil.rmtree(d, ignore_errors=True)
