"""Voxel-grid geometry shared by pre-processing and the store: RAS reorientation and origin-aligned resampling.

Arrays are indexed (X, Y, Z) in voxel order of their affine. Resampling keeps the world position of voxel (0, 0, 0)
and scales the affine's columns: output voxel ``j`` samples input position ``j * scale``.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient (..., X, Y, Z) to the closest RAS voxel order (axis permutations and flips only, no interpolation).

    Returns:
        (reoriented array (a view where possible), its affine)
    """
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, nib.orientations.axcodes2ornt("RAS")):
        return data, affine
    lead = data.ndim - 3
    moved = np.moveaxis(data, list(range(lead)), list(range(3, 3 + lead))) if lead else data
    out = nib.orientations.apply_orientation(moved, ornt)
    out = np.moveaxis(out, list(range(3, 3 + lead)), list(range(lead))) if lead else out
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape[-3:])
    return np.ascontiguousarray(out), new_affine


def from_ras(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_ras`: (..., X, Y, Z) in RAS voxel order -> the original voxel order."""
    ornt = nib.orientations.io_orientation(original_affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    if np.array_equal(back, nib.orientations.axcodes2ornt("RAS")):
        return data
    lead = data.ndim - 3
    moved = np.moveaxis(data, list(range(lead)), list(range(3, 3 + lead))) if lead else data
    out = nib.orientations.apply_orientation(moved, back)
    return np.ascontiguousarray(np.moveaxis(out, list(range(3, 3 + lead)), list(range(lead))) if lead else out)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))


def resampled_shape(shape: tuple[int, ...], spacing: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """Output grid size covering the same extent: round(shape * spacing / target), at least 1."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True))  # type: ignore[return-value]


def zoom_grid(data: np.ndarray, scale: np.ndarray, out_shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample (..., X, Y, Z) so that output voxel j samples input position j * scale (origin kept).

    Args:
        data: (..., X, Y, Z) array; leading axes (channels) are resampled one by one.
        scale: (3,) input voxels per output voxel.
        out_shape: (3,) output grid.
        order: 0 nearest (labels), 1 linear (images).
    Returns:
        (..., *out_shape) array of ``data``'s dtype.
    """
    if tuple(data.shape[-3:]) == tuple(out_shape) and np.allclose(scale, 1.0):
        return data
    lead = data.shape[:-3]
    flat = data.reshape((-1, *data.shape[-3:]))
    out = np.empty((flat.shape[0], *out_shape), dtype=data.dtype)
    for i in range(flat.shape[0]):
        ndimage.affine_transform(
            flat[i],
            np.asarray(scale, dtype=np.float64),
            output_shape=tuple(out_shape),
            output=out[i],
            order=order,
            mode="nearest",
            prefilter=False,
        )
    return out.reshape((*lead, *out_shape))
