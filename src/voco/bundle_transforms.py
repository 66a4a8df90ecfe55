"""voco's pre-processing as one invertible MONAI dictionary transform, shipped inside exported MONAI bundles.

``voco export --format monai-bundle`` copies this file to ``<bundle>/scripts/voco_transforms.py``; MONAI puts the
bundle root on ``sys.path`` when it runs a bundle, so ``inference.json`` names it as
``scripts.voco_transforms.VocoPreprocessd``. It depends on numpy, scipy, nibabel, torch and MONAI only (never on
voco), and reproduces ``voco predict`` voxel for voxel:

* forward: RAS (axis permutations / flips), resampling onto voco's grid (origin kept, ``round(n * s / t)`` voxels,
  linear, edge values beyond the last voxel), HU window scaled to [0, 1], crop to the voxels above the window's low
  end, symmetric zero padding up to the ROI, rounding to the store's precision (float16);
* inverse (for ``Invertd`` on class probabilities): undo the padding and crop (background certain outside the crop),
  resample each class back (linear), undo the reorientation: probabilities on the scan's own grid, ready for argmax.

``tests/test_export.py`` checks that the forward equals ``voco.eval.predict.prepare`` exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from scipy import ndimage


def _ornt(affine: np.ndarray) -> np.ndarray:
    return nib.orientations.io_orientation(affine)


def _apply_ornt(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Reorient the last three axes of (C, X, Y, Z)."""
    moved = np.moveaxis(arr, 0, 3)
    out = nib.orientations.apply_orientation(moved, ornt)
    return np.ascontiguousarray(np.moveaxis(out, 3, 0))


def _zoom(arr: np.ndarray, scale: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Output voxel j samples input position j * scale (per channel; edge values outside)."""
    if tuple(arr.shape[1:]) == tuple(shape) and np.allclose(scale, 1.0):
        return arr
    out = np.empty((arr.shape[0], *shape), dtype=arr.dtype)
    for c in range(arr.shape[0]):
        ndimage.affine_transform(arr[c], np.asarray(scale, dtype=np.float64), output_shape=tuple(shape),
                                 output=out[c], order=order, mode="nearest", prefilter=False)
    return out


class VocoPreprocessd(MapTransform, InvertibleTransform):
    """voco's pre-processing of a (C, X, Y, Z) CT MetaTensor (see the module docstring).

    Args:
        keys: the image key(s).
        spacing: target spacing (mm) along the RAS axes.
        window: HU window [low, high].
        roi: pad every volume to at least this size (voxels).
        storage_dtype: the precision voco stored training images in (``float16``).
    """

    def __init__(self, keys: Any, spacing: Sequence[float], window: Sequence[float], roi: Sequence[int],
                 storage_dtype: str = "float16", allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.window = (float(window[0]), float(window[1]))
        self.roi = [int(r) for r in roi]
        self.storage_dtype = storage_dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            affine = np.asarray(img.affine, dtype=np.float64)
            arr = np.asarray(img.detach().cpu().numpy() if torch.is_tensor(img) else img, dtype=np.float32)
            x, geom = self.forward(arr, affine)
            out = MetaTensor(torch.from_numpy(x), affine=torch.as_tensor(geom["affine"], dtype=torch.float64),
                             meta=dict(img.meta) if isinstance(img, MetaTensor) else {})
            if isinstance(img, MetaTensor):
                out.applied_operations = list(img.applied_operations)
            self.push_transform(out, orig_size=list(arr.shape[1:]), extra_info=geom)
            d[key] = out
        return d

    def forward(self, image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """(C, X, Y, Z) float32 in file voxel order + its affine -> (pre-processed image, geometry to invert)."""
        ornt = _ornt(affine)
        ras = _apply_ornt(image, ornt)
        ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, image.shape[1:])
        spacing = np.sqrt((ras_affine[:3, :3] ** 2).sum(0))
        if np.allclose(spacing, self.spacing, rtol=1e-4, atol=1e-5):
            shape, scale, res_affine = list(ras.shape[1:]), np.ones(3), ras_affine.copy()
        else:
            shape = [max(1, int(round(n * s / t))) for n, s, t in zip(ras.shape[1:], spacing, self.spacing,
                                                                     strict=True)]
            scale = self.spacing / spacing
            res_affine = ras_affine.copy()
            res_affine[:3, :3] = ras_affine[:3, :3] * scale[None, :]
        x = np.array(_zoom(np.ascontiguousarray(ras, dtype=np.float32), scale, shape, 1), dtype=np.float32)
        lo, hi = self.window
        np.clip(x, lo, hi, out=x)
        x -= lo
        x /= hi - lo
        fg = (x > 0).any(0)
        if not fg.any():
            raise ValueError(f"no voxel above the window's low end ({lo:g} HU)")
        start, stop = [], []
        for ax in range(3):
            idx = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))
            start.append(int(idx[0]))
            stop.append(int(idx[-1]) + 1)
        x = x[(slice(None), *(slice(a, b) for a, b in zip(start, stop, strict=True)))]
        before = [max(0, r - n) // 2 for n, r in zip(x.shape[1:], self.roi, strict=True)]
        after = [max(0, r - n) - b for n, r, b in zip(x.shape[1:], self.roi, before, strict=True)]
        if any(before) or any(after):
            x = np.pad(x, [(0, 0), *zip(before, after, strict=True)])
        x = x.astype(self.storage_dtype).astype(np.float32)
        shift = np.eye(4)
        shift[:3, 3] = np.asarray(start) - np.asarray(before)
        geom = {"affine": (res_affine @ shift).tolist(), "original_affine": affine.tolist(),
                "original_shape": list(image.shape[1:]), "ras_shape": list(ras.shape[1:]), "scale": scale.tolist(),
                "resampled_shape": shape, "crop_start": start, "crop_stop": stop, "pad_before": before,
                "shape": list(x.shape[1:])}
        return np.ascontiguousarray(x), geom

    @staticmethod
    def to_original(probs: np.ndarray, geom: Mapping[str, Any]) -> np.ndarray:
        """(K, ...) class probabilities on the pre-processed grid -> (K, *original_shape) on the scan's grid."""
        start, stop, before = (np.asarray(geom[k]) for k in ("crop_start", "crop_stop", "pad_before"))
        inner = probs[(slice(None), *(slice(int(b), int(b + n)) for b, n in zip(before, stop - start, strict=True)))]
        full = np.zeros((probs.shape[0], *geom["resampled_shape"]), dtype=np.float32)
        full[0] = 1.0  # outside the foreground crop: background
        full[(slice(None), *(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True)))] = inner
        ras = _zoom(full, 1.0 / np.asarray(geom["scale"]), geom["ras_shape"], 1)
        original = np.asarray(geom["original_affine"])
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), _ornt(original))
        return _apply_ornt(ras, back)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            op = self.pop_transform(pred)
            geom = op["extra_info"]
            probs = np.asarray(pred.detach().cpu().numpy(), dtype=np.float32)
            out = self.to_original(probs, geom)
            meta = dict(pred.meta) if isinstance(pred, MetaTensor) else {}
            result = MetaTensor(torch.from_numpy(out), affine=torch.as_tensor(geom["original_affine"]), meta=meta)
            if isinstance(pred, MetaTensor):
                result.applied_operations = list(pred.applied_operations)
            d[key] = result
        return d
