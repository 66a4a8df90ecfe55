"""VoCo crop geometry: base crops, random crops, overlap position labels, per-crop augmentation (SPEC 2).

Coordinates are voxels of the crop *block*: a (g*r) x (g*r) x r sub-volume (method ``voco``) or the whole volume resized
to (g*R) x (g*R) x R (method ``voco-v1``). Axis 0 is x, axis 1 is y, axis 2 is z (RAS arrays ``(X, Y, Z)``).

* base crop k = g*i + j covers x in [r*i, r*(i+1)), y in [r*j, r*(j+1)), all of z;
* a random crop with centre (cx, cy) covers x in [cx - r/2, cx + r/2), y likewise, all of z;
* its position label y[k] = (x-y overlap area with base crop k) / r^2; labels are computed before augmentation.

Everything random is drawn from one ``numpy.random.Generator`` so that a seed reproduces a sample exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from voco.errors import DataError

log = logging.getLogger(__name__)

METHODS = ("voco", "voco-v1")

#: SPEC 1: reference region repetition abdomen x8, head-neck x8, chest x1 (other regions: ``default_weight``).
DEFAULT_REGION_WEIGHTS: dict[str, float] = {"abdomen": 8.0, "head_neck": 8.0, "chest": 1.0}


@dataclass(frozen=True)
class CropAugment:
    """Independent per-crop augmentation (SPEC 2 defaults, the reference's MONAI chain).

    Each axis is flipped with probability ``flip_p``; with probability ``rot90_p`` the crop is rotated in the x-y plane
    by k*90 degrees, k uniform in {1, 2, 3}; with probability ``shift_p`` a constant uniform in [-shift, shift] is added.
    """

    flip_p: float = 0.2
    rot90_p: float = 0.2
    shift: float = 0.1
    shift_p: float = 0.5

    @classmethod
    def none(cls) -> CropAugment:
        return cls(0.0, 0.0, 0.0, 0.0)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> CropAugment:
        """From the ``pretrain.voco.augment`` config mapping (missing keys keep the SPEC defaults)."""
        cfg = dict(cfg or {})
        return cls(**{k: float(cfg[k]) for k in ("flip_p", "rot90_p", "shift", "shift_p") if k in cfg})

    def __call__(self, crop: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment one crop ``(..., X, Y, Z)`` (cubic in x-y); returns a new tensor of the same shape."""
        out = crop
        for axis in (-3, -2, -1):
            if rng.random() < self.flip_p:
                out = out.flip(axis)
        if rng.random() < self.rot90_p:
            out = torch.rot90(out, int(rng.integers(1, 4)), dims=(-3, -2))
        if rng.random() < self.shift_p:
            out = out + float(rng.uniform(-self.shift, self.shift))
        return out.contiguous()


def position_labels(
    centers_xy: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    roi: int,
    grid: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Overlap position labels of random crops against the g x g base crops.

    Args:
        centers_xy: ``(sw, 2)`` (or ``(2,)``) x-y centres of the random crops in block voxels; may be half-integers.
        roi: crop side r (base and random crops alike), in voxels.
        grid: g, base crops per side.
        dtype: floating dtype of the result.

    Returns:
        ``(sw, grid*grid)`` tensor; entry ``[s, grid*i + j]`` = overlap area of random crop s (x in [cx - r/2, cx + r/2),
        y likewise) with base crop (i, j) (x in [r*i, r*(i+1)), y in [r*j, r*(j+1))) divided by r^2. Rows sum to 1 when
        the random crop lies inside the block.
    """
    if roi <= 0 or grid <= 0:
        raise ValueError(f"position_labels: roi and grid must be positive, got roi={roi}, grid={grid}")
    if isinstance(centers_xy, torch.Tensor):
        c = centers_xy.detach().to(device="cpu", dtype=torch.float64)
    else:
        c = torch.as_tensor(np.asarray(centers_xy, dtype=np.float64), dtype=torch.float64)
    if c.ndim == 1:
        c = c.unsqueeze(0)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"position_labels: centers_xy must have shape (sw, 2), got {tuple(c.shape)}")
    half = roi / 2.0
    lo_base = torch.arange(grid, dtype=torch.float64) * roi  # (g,)
    hi_base = lo_base + roi
    lo = c - half  # (sw, 2)
    hi = c + half
    # overlap lengths along x and y with each base interval: (sw, g)
    dx = (torch.minimum(hi[:, :1], hi_base) - torch.maximum(lo[:, :1], lo_base)).clamp_min(0.0)
    dy = (torch.minimum(hi[:, 1:], hi_base) - torch.maximum(lo[:, 1:], lo_base)).clamp_min(0.0)
    area = dx[:, :, None] * dy[:, None, :]  # (sw, i, j)
    return (area.reshape(c.shape[0], grid * grid) / float(roi * roi)).to(dtype)


def block_shape(grid: int, roi: int) -> tuple[int, int, int]:
    """Shape of the crop block, ``(g*r, g*r, r)``."""
    return (grid * roi, grid * roi, roi)


def sample_centers(sw: int, grid: int, roi: int, rng: np.random.Generator) -> np.ndarray:
    """``(sw, 2)`` random-crop centres: integer starts uniform in [0, (g-1)*r), centre = start + r/2.

    For even r these are the integer centres uniform in [r/2, g*r - r/2) of SPEC 2 (the reference's ``randint``).
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2 for random crops, got {grid}")
    starts = rng.integers(0, (grid - 1) * roi, size=(sw, 2))
    return starts.astype(np.float64) + roi / 2.0


def as_rng(rng: np.random.Generator | torch.Generator | int | None) -> np.random.Generator:
    """A numpy Generator from a Generator, a torch Generator (one draw from it seeds ours), a seed or ``None``."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))
    return np.random.default_rng(rng)


def _as_volume(volume: np.ndarray | torch.Tensor, name: str = "volume") -> np.ndarray | torch.Tensor:
    if volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise DataError(f"{name}: expected a 3-D (X, Y, Z) image, got shape {tuple(volume.shape)}")
    if min(volume.shape) < 1:
        raise DataError(f"{name}: empty image of shape {tuple(volume.shape)}")
    return volume


def _to_float_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(dtype=torch.float32, device="cpu")
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def extract_block(
    volume: np.ndarray | torch.Tensor,
    shape: Sequence[int],
    rng: np.random.Generator,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A random ``shape`` sub-block of ``volume`` (X, Y, Z); axes shorter than ``shape`` are padded symmetrically.

    Only the block is read (a memory-mapped store array is never loaded whole).

    Returns:
        ``(block, origin)``: float32 tensor of ``shape`` and the block origin in volume voxels (negative where padded).
    """
    volume = _as_volume(volume)
    block = torch.full(tuple(shape), float(pad_value), dtype=torch.float32)
    src, dst, origin = [], [], []
    for size, length in zip(volume.shape, shape, strict=True):
        o = int(rng.integers(0, size - length + 1)) if size >= length else -((length - size) // 2)
        v0, v1 = max(o, 0), min(o + length, size)
        src.append(slice(v0, v1))
        dst.append(slice(v0 - o, v1 - o))
        origin.append(o)
    block[tuple(dst)] = _to_float_tensor(volume[tuple(src)])
    return block, (origin[0], origin[1], origin[2])


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of ``(X, Y, Z)`` to ``size`` (align_corners=True, as the reference)."""
    if tuple(x.shape) == tuple(size):
        return x
    return F.interpolate(x[None, None], size=tuple(size), mode="trilinear", align_corners=True)[0, 0]


def sample_voco_views(
    volume: np.ndarray | torch.Tensor,
    grid: int,
    roi: int,
    sw: int,
    rng: np.random.Generator | torch.Generator | int | None = None,
    method: str = "voco",
    *,
    augment: CropAugment | Mapping[str, Any] | None = None,
    out_size: int | None = None,
    pad_value: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Base crops, random crops and position labels for one volume.

    Args:
        volume: ``(X, Y, Z)`` image (numpy, possibly memory-mapped float16, or tensor); a leading channel of 1 is allowed.
        grid: g (``voco``: 3; ``voco-v1``: 4).
        roi: r, the crop side in block voxels (``voco``: 64; ``voco-v1``: 96, the side before resizing).
        sw: random crops per volume.
        rng: numpy Generator (or a torch Generator, a seed); every random draw comes from it.
        method: ``voco`` - a random (g*r) x (g*r) x r block of the volume (padded when smaller);
            ``voco-v1`` - the whole volume resized to (g*r) x (g*r) x r, every crop then resized to ``out_size``^3.
        augment: per-crop augmentation (``CropAugment`` or its config mapping); ``None`` = SPEC defaults,
            ``CropAugment.none()`` = no augmentation.
        out_size: side of the returned crops (each crop is resized trilinearly when it differs from r); default r for
            ``voco``, 64 for ``voco-v1`` (the reference).
        pad_value: value of padded voxels (images are in [0, 1] with air at 0).

    Returns:
        dict with ``base`` ``(g*g, 1, s, s, s)`` float32 (index k = g*i + j), ``rand`` ``(sw, 1, s, s, s)``,
        ``labels`` ``(sw, g*g)`` float32, ``centers`` ``(sw, 2)`` float64 (block voxels), ``origin`` ``(3,)`` int64
        (block origin in volume voxels; zeros for ``voco-v1``) - with s = r (``voco``) or ``out_size`` (``voco-v1``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown VoCo method {method!r} (expected one of {', '.join(METHODS)})")
    if sw < 1 or roi < 1:
        raise ValueError(f"sw and roi must be positive, got sw={sw}, roi={roi}")
    rng = as_rng(rng)
    if augment is None:
        augment = CropAugment()
    elif not isinstance(augment, CropAugment):
        augment = CropAugment.from_config(augment)
    volume = _as_volume(volume)
    shape = block_shape(grid, roi)

    if method == "voco":
        block, origin = extract_block(volume, shape, rng, pad_value=pad_value)
        side = roi if out_size is None else int(out_size)
    else:
        block, origin = _resize(_to_float_tensor(volume), shape), (0, 0, 0)
        side = 64 if out_size is None else int(out_size)

    centers = sample_centers(sw, grid, roi, rng)
    labels = position_labels(centers, roi, grid)

    def finish(crop: torch.Tensor) -> torch.Tensor:
        crop = _resize(crop, (side, side, side))
        return augment(crop, rng).unsqueeze(0)

    bases = []
    for i in range(grid):
        for j in range(grid):
            bases.append(finish(block[i * roi : (i + 1) * roi, j * roi : (j + 1) * roi, :]))
    rands = []
    for cx, cy in centers:
        x0, y0 = int(cx - roi / 2), int(cy - roi / 2)
        rands.append(finish(block[x0 : x0 + roi, y0 : y0 + roi, :]))
    return {
        "base": torch.stack(bases),
        "rand": torch.stack(rands),
        "labels": labels,
        "centers": torch.from_numpy(centers),
        "origin": torch.tensor(origin, dtype=torch.int64),
    }


def collate_views(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack B samples of ``sample_voco_views`` into one step's network inputs.

    Returns:
        ``rand`` ``(B*sw, 1, s, s, s)`` (volume-major), ``base`` ``(B*n, 1, s, s, s)``, ``labels`` ``(B, sw, n)``,
        ``centers`` ``(B, sw, 2)``.
    """
    if not samples:
        raise ValueError("collate_views: no samples")
    return {
        "rand": torch.cat([s["rand"] for s in samples]),
        "base": torch.cat([s["base"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "centers": torch.stack([s["centers"] for s in samples]),
    }


def region_balanced_indices(
    regions: Sequence[str],
    n: int,
    rng: np.random.Generator | torch.Generator | int | None = None,
    weights: Mapping[str, float] | None = None,
    *,
    mode: str = "volume",
    default_weight: float = 1.0,
) -> np.ndarray:
    """Draw ``n`` volume indices with region balancing (SPEC 1).

    Args:
        regions: region tag of every volume (e.g. ``abdomen``, ``chest``).
        n: number of indices to draw (with replacement).
        rng: numpy Generator or seed.
        weights: region -> weight (default ``DEFAULT_REGION_WEIGHTS``); regions not named get ``default_weight``;
            weight 0 leaves a region out.
        mode: ``volume`` (default, the reference's repetition of each source list) - each volume has its region's
            weight, so a region is drawn with probability proportional to weight x volume count; ``region`` (region
            balancing) - a region is drawn with probability proportional to its weight (among the regions present)
            whatever its size, then a volume uniformly inside it.

    Returns:
        ``(n,)`` int64 indices into ``regions``.
    """
    if mode not in ("region", "volume"):
        raise ValueError(f"region_balanced_indices: mode must be 'region' or 'volume', got {mode!r}")
    rng = as_rng(rng)
    if len(regions) == 0:
        raise DataError("region-balanced sampling: the pre-training corpus is empty")
    w = DEFAULT_REGION_WEIGHTS if weights is None else weights
    tags = np.asarray([str(r) for r in regions])
    names = sorted(set(tags.tolist()))
    wr = np.array([float(w.get(name, default_weight)) for name in names])
    if np.any(wr < 0):
        raise ValueError(f"region weights must be >= 0, got {dict(zip(names, wr.tolist(), strict=True))}")
    if wr.sum() <= 0:
        raise DataError(f"region-balanced sampling: every region present ({', '.join(names)}) has weight 0")
    if mode == "volume":
        per_volume = wr[np.searchsorted(names, tags)]
        return rng.choice(len(tags), size=n, p=per_volume / per_volume.sum()).astype(np.int64)
    members = [np.flatnonzero(tags == name) for name in names]
    picked = rng.choice(len(names), size=n, p=wr / wr.sum())
    out = np.empty(n, dtype=np.int64)
    for r_idx, idx in enumerate(members):
        sel = picked == r_idx
        out[sel] = idx[rng.integers(0, len(idx), size=int(sel.sum()))]
    return out
