"""DICOM series -> one NIfTI volume, with geometry checks.

Reading: every file in a folder (with or without ``.dcm``; non-DICOM files are skipped), grouped by SeriesInstanceUID
(mixed folders: the largest series wins with a warning, a tie is an error), slices sorted by their position along the
slice normal (cross product of the ImageOrientationPatient row and column directions), then checked: one orientation,
one pixel grid, no duplicate positions, no gantry tilt, equal steps (a gap that is a whole number of steps is reported as
missing slices at the positions named). Pixel values are rescaled to HU per slice (RescaleSlope/Intercept).

Geometry: DICOM patient coordinates are LPS; the volume's voxel axes are (column, row, slice) so the native affine is
``[row_dir * col_spacing, col_dir * row_spacing, step, first_position]`` in LPS, converted to RAS by negating x and y.
By default the volume is then reoriented to LAS (``orientation="LAS"``), which is what dicom2nifti (and therefore
TotalSegmentator) writes; pass ``None`` to keep the native axes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from voco.errors import DicomError

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass
class SeriesGeometry:
    """Sorted slice order and the voxel-to-RAS affine of the native (column, row, slice) stack."""

    order: list[int]  # indices into the header list, sorted along the normal
    affine: np.ndarray  # native (col, row, slice) -> RAS
    shape: tuple[int, int, int]  # (columns, rows, slices)
    spacing: tuple[float, float, float]
    orientation: str | None = "LAS"

    def to_volume(self, stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Turn a stack of slices (in header order, shape (n, rows, cols)) into (array (X, Y, Z), affine)."""
        vol = np.transpose(np.asarray(stack)[self.order], (2, 1, 0))  # (cols, rows, slices)
        return reorient(vol, self.affine, self.orientation)


@dataclasses.dataclass
class DicomVolume:
    array: np.ndarray  # (X, Y, Z) HU (float32, or int16 when the rescale keeps integers)
    affine: np.ndarray
    meta: dict

    def to_nifti(self) -> nib.Nifti1Image:
        img = nib.Nifti1Image(self.array, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img


def reorient(
    array: np.ndarray, affine: np.ndarray, axcodes: str | Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Reorder / flip voxel axes so that they point along ``axcodes`` (e.g. "LAS"); the world geometry is unchanged."""
    if not axcodes:
        return array, affine
    current = nio.io_orientation(affine)
    target = nio.axcodes2ornt(tuple(axcodes))
    xform = nio.ornt_transform(current, target)
    out = nio.apply_orientation(array, xform)
    new_aff = affine @ nio.inv_ornt_aff(xform, array.shape)
    return np.ascontiguousarray(out), new_aff


def _is_dicom_candidate(path: Path) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    return path.name.upper() != "DICOMDIR" and path.suffix.lower() not in (
        ".json",
        ".txt",
        ".nii",
        ".gz",
        ".md",
        ".csv",
    )


def read_headers(folder: str | os.PathLike[str]) -> list[tuple[Path, object]]:
    """(path, dataset without pixel data) for every readable DICOM image file under ``folder`` (recursive)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"{folder}: not a folder")
    out = []
    for path in sorted(p for p in folder.rglob("*") if _is_dicom_candidate(p)):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception as e:  # noqa: BLE001 - anything unreadable is "not DICOM"
                log.debug("skip %s: %s", path, e)
                continue
        except Exception as e:  # noqa: BLE001
            log.warning("skip unreadable file %s: %s", path, e)
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            log.debug("skip %s: no image geometry (not an image slice)", path)
            continue
        out.append((path, ds))
    if not out:
        raise DicomError(f"{folder}: no DICOM image slices found")
    return out


def select_series(headers: list[tuple[Path, object]], folder: Path, series_uid: str | None = None) -> list:
    """Keep one SeriesInstanceUID: the requested one, the only one, or the strictly largest (with a warning)."""
    groups: dict[str, list] = {}
    for path, ds in headers:
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "") or ""), []).append((path, ds))
    if series_uid is not None:
        if series_uid not in groups:
            raise DicomError(f"{folder}: series {series_uid} not found (series here: {', '.join(sorted(groups))})")
        return groups[series_uid]
    if len(groups) == 1:
        return next(iter(groups.values()))
    sizes = sorted(((len(v), k) for k, v in groups.items()), reverse=True)
    desc = ", ".join(f"{k or '<no uid>'} ({n} files)" for n, k in sizes)
    if sizes[0][0] == sizes[1][0]:
        raise DicomError(f"{folder}: mixed series of equal size, cannot choose: {desc}; put one series per folder")
    log.warning("%s: mixed series (%s); using the largest, %s", folder, desc, sizes[0][1])
    return groups[sizes[0][1]]


def _tag(ds, name: str, path: Path):
    """A required header value, or a DicomError naming the slice and the missing tag."""
    value = getattr(ds, name, None)
    if value is None or (isinstance(value, str | bytes | list | tuple) and len(value) == 0):
        raise DicomError(f"{path}: slice has no {name} (required to place it in the volume); the series is rejected")
    return value


def _int_tag(ds, name: str, path: Path) -> int:
    value = _tag(ds, name, path)
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise DicomError(f"{path}: unreadable {name} {value!r}") from None
    if out < 1:
        raise DicomError(f"{path}: {name} is {out}; a slice needs at least one row and column")
    return out


def _floats(v, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DicomError(f"{path}: unreadable {what} {v!r}") from e
    if arr.shape != (n,):
        raise DicomError(f"{path}: {what} must have {n} values, got {v!r}")
    return arr


def geometry(
    headers: list[tuple[Path, object]], folder: Path, orientation: str | None = "LAS", rtol: float = 0.02
) -> SeriesGeometry:
    """Sort slices along the normal and check the series is one regular grid; raise DicomError naming the problem."""
    first_path, first = headers[0]
    iop = _floats(_tag(first, "ImageOrientationPatient", first_path), 6, "ImageOrientationPatient", first_path)
    row_dir, col_dir = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise DicomError(f"{first_path}: ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    normal = np.cross(row_dir, col_dir)
    rows, cols = _int_tag(first, "Rows", first_path), _int_tag(first, "Columns", first_path)
    ps = _floats(_tag(first, "PixelSpacing", first_path), 2, "PixelSpacing", first_path)  # (row, column spacing)
    if not np.all(np.isfinite(ps)) or np.any(ps <= 0):
        raise DicomError(f"{first_path}: PixelSpacing {ps.tolist()} must be two positive numbers")
    positions = []
    for path, ds in headers:
        other = _floats(_tag(ds, "ImageOrientationPatient", path), 6, "ImageOrientationPatient", path)
        if not np.allclose(other, iop, atol=1e-4):
            raise DicomError(
                f"{folder}: inconsistent orientation: {path.name} has ImageOrientationPatient {other.tolist()}, "
                f"{first_path.name} has {iop.tolist()}"
            )
        r, c = _int_tag(ds, "Rows", path), _int_tag(ds, "Columns", path)
        if r != rows or c != cols:
            raise DicomError(f"{folder}: {path.name} is {r}x{c}, {first_path.name} is {rows}x{cols}")
        spacing = _floats(_tag(ds, "PixelSpacing", path), 2, "PixelSpacing", path)
        if not np.allclose(spacing, ps, rtol=1e-4):
            raise DicomError(f"{folder}: {path.name} has PixelSpacing {spacing.tolist()}, expected {ps.tolist()}")
        positions.append(_floats(_tag(ds, "ImagePositionPatient", path), 3, "ImagePositionPatient", path))
    pos = np.array(positions)
    dist = pos @ normal
    order = [int(i) for i in np.argsort(dist, kind="stable")]
    dist_sorted = dist[order]
    n = len(order)
    if n > 1:
        steps = np.diff(dist_sorted)
        dup = np.flatnonzero(steps < 1e-3)
        if dup.size:
            a, b = headers[order[dup[0]]][0].name, headers[order[dup[0] + 1]][0].name
            raise DicomError(
                f"{folder}: {dup.size} duplicate slice position(s) (e.g. {a} and {b} at {dist_sorted[dup[0]]:.3f} mm "
                "along the normal); several acquisitions in one series?"
            )
        step = float(np.min(steps))
        ratio = steps / step
        whole = np.rint(ratio)
        if np.any(np.abs(ratio - whole) > rtol):
            bad = int(np.flatnonzero(np.abs(ratio - whole) > rtol)[0])
            raise DicomError(
                f"{folder}: inconsistent slice spacing: steps range {steps.min():.4f}..{steps.max():.4f} mm "
                f"(first irregular step after the slice at {dist_sorted[bad]:.3f} mm along the normal)"
            )
        if np.any(whole > 1):
            missing = []
            for i in np.flatnonzero(whole > 1):
                for k in range(1, int(whole[i])):
                    missing.append(round(float(dist_sorted[i] + k * step), 3))
            shown = ", ".join(f"{m:g}" for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DicomError(
                f"{folder}: {len(missing)} missing slice(s): the spacing is {step:.4f} mm but there are gaps; "
                f"missing positions along the slice normal (mm): {shown}"
            )
        # in-plane drift of the positions = gantry tilt / sheared stack
        offsets = pos[order] - pos[order[0]]
        inplane = offsets - np.outer(offsets @ normal, normal)
        if np.max(np.linalg.norm(inplane, axis=1)) > max(0.01, 0.05 * step):
            raise DicomError(f"{folder}: slice positions drift in-plane (gantry tilt or sheared stack): not supported")
        step_vec = (pos[order[-1]] - pos[order[0]]) / (n - 1)
    else:
        thick = float(getattr(first, "SliceThickness", 0) or 0) or 1.0
        step_vec = normal * thick
        step = thick
    aff_lps = np.eye(4)
    aff_lps[:3, 0] = row_dir * ps[1]
    aff_lps[:3, 1] = col_dir * ps[0]
    aff_lps[:3, 2] = step_vec
    aff_lps[:3, 3] = pos[order[0]]
    return SeriesGeometry(
        order=order,
        affine=LPS_TO_RAS @ aff_lps,
        shape=(cols, rows, n),
        spacing=(float(ps[1]), float(ps[0]), float(np.linalg.norm(step_vec))),
        orientation=orientation,
    )


def read_series(
    folder: str | os.PathLike[str],
    series_uid: str | None = None,
    orientation: str | None = "LAS",
) -> DicomVolume:
    """Read one DICOM series folder into a HU volume.

    Args:
        folder: the series folder (files with or without ``.dcm``; searched recursively).
        series_uid: pick this SeriesInstanceUID when the folder mixes series.
        orientation: target axis codes of the output (default LAS, dicom2nifti's convention), None for native.

    Returns:
        DicomVolume: ``array`` (X, Y, Z) in HU, ``affine`` voxel -> RAS mm, ``meta`` (series uid, spacing, files ...).

    Raises:
        DicomError: no slices, ambiguous mixed series, inconsistent orientation / grid / spacing, missing slices.
    """
    import pydicom

    folder = Path(folder)
    headers = select_series(read_headers(folder), folder, series_uid)
    geo = geometry(headers, folder, orientation)
    slices = []
    integral = True
    for path, _ in headers:
        try:
            ds = pydicom.dcmread(path, force=True)
            raw = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - decoder errors come in many types
            raise DicomError(f"{path}: cannot decode pixel data ({type(e).__name__}: {e})") from e
        if raw.ndim != 2:
            raise DicomError(f"{path}: expected one 2-D frame, got pixel array of shape {raw.shape}")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        integral &= slope.is_integer() and intercept.is_integer()
        slices.append(raw.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    stack = np.stack(slices)
    if integral and stack.min() >= -32768 and stack.max() <= 32767:
        stack = stack.astype(np.int16)
    array, affine = geo.to_volume(stack)
    first = headers[0][1]
    meta = {
        "folder": str(folder),
        "series_uid": str(getattr(first, "SeriesInstanceUID", "")),
        "n_slices": len(headers),
        "spacing": [round(s, 6) for s in geo.spacing],
        "modality": str(getattr(first, "Modality", "")),
        "files": [headers[i][0].name for i in geo.order],
    }
    return DicomVolume(array=array, affine=affine, meta=meta)


def write_nifti(vol: DicomVolume, path: str | os.PathLike[str]) -> None:
    """Write the volume atomically as NIfTI (``.nii.gz``)."""
    from voco.io import atomic_path

    with atomic_path(path) as tmp:
        nib.save(vol.to_nifti(), tmp)


def _ds(v: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``v``."""
    for digits in (6, 5, 4, 3, 2, 1, 0):
        s = f"{round(float(v), digits):.{digits}f}".rstrip("0").rstrip(".") if digits else f"{round(float(v))}"
        if len(s) <= 16:
            return "0" if s in ("-0", "") else s
    raise ValueError(f"{v} does not fit a DICOM DS")


def write_series(
    image: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike[str],
    case_id: str,
    dataset: str = "voco",
    seed: int = 0,
) -> SeriesGeometry:
    """Write a HU volume as an uncompressed CT DICOM series (one file per slice, no suffix), atomically.

    Args:
        image: (X, Y, Z) integer HU volume; voxel axes (column, row, slice) of the series.
        affine: voxel -> RAS affine with orthogonal axes (the third axis becomes the slice direction).
        folder: the series folder (replaced as a whole).
        case_id, dataset, seed: make the UIDs deterministic and the patient fields readable.

    Returns:
        The geometry of the written headers, exactly as :func:`read_series` will compute it, so callers can put labels
        on the converted grid (``geometry.to_volume(label_stack)`` with ``label_stack`` (Z, Y, X) in slice order).
    """
    import shutil
    import tempfile

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    aff_lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = aff_lps[:3, 0], aff_lps[:3, 1], aff_lps[:3, 2]
    row_dir = col_step / np.linalg.norm(col_step)  # direction along a row = increasing column index
    col_dir = row_step / np.linalg.norm(row_step)
    iop = [_ds(v) for v in (*row_dir, *col_dir)]
    pixel_spacing = [_ds(np.linalg.norm(row_step)), _ds(np.linalg.norm(col_step))]
    thickness = _ds(np.linalg.norm(slice_step))
    nx, ny, nz = image.shape
    key = [dataset, case_id, str(seed)]
    study_uid = generate_uid(entropy_srcs=[*key, "study"])
    series_uid = generate_uid(entropy_srcs=[*key, "series"])
    frame_uid = generate_uid(entropy_srcs=[*key, "frame"])
    stored = np.clip(np.asarray(image, dtype=np.int32) + 1024, 0, 4095).astype(np.uint16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    headers = []
    try:
        for k in range(nz):
            pos = aff_lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + aff_lps[:3, 3]
            sop_uid = generate_uid(entropy_srcs=[*key, "slice", str(k)])
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.Modality = "CT"
            ds.PatientName = case_id
            ds.PatientID = case_id
            ds.StudyDate = ds.SeriesDate = "20000101"
            ds.StudyID, ds.SeriesNumber = "1", 1
            ds.SeriesDescription = f"voco phantom {dataset}"
            ds.Manufacturer = "voco"
            # instance numbers run from the top slice down, as many scanners do (readers must sort by position)
            ds.InstanceNumber = nz - k
            ds.ImagePositionPatient = [_ds(v) for v in pos]
            ds.ImageOrientationPatient = iop
            ds.SliceLocation = _ds(pos @ np.cross(row_dir, col_dir))
            ds.PixelSpacing = pixel_spacing
            ds.SliceThickness = thickness
            ds.Rows, ds.Columns = ny, nx
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            path = tmp / f"IM{nz - k:04d}"
            ds.save_as(path, enforce_file_format=True)
            headers.append((path, ds))
        geo = geometry(headers, folder)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return geo
