"""Labelled-crop sampling: r^3 crops centred on foreground with probability pos / (pos + neg) (RandCropByPosNegLabel).

Works on the store's memory-mapped arrays: only the crops are read. Foreground / background voxel indices are found
once per case and cached (the reference's MONAI transform recomputes them on every call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def crop_start(center: Sequence[int], shape: Sequence[int], roi: Sequence[int]) -> tuple[int, ...]:
    """Start corner of the ``roi`` box centred on ``center``, shifted to lie inside ``shape`` (0 if shape < roi)."""
    return tuple(
        int(min(max(int(c) - r // 2, 0), max(s - r, 0))) for c, s, r in zip(center, shape, roi, strict=True)
    )


def extract(arr: np.ndarray, start: Sequence[int], roi: Sequence[int], fill: float = 0) -> np.ndarray:
    """``arr[start : start + roi]`` (last 3 axes), padded with ``fill`` where the volume is smaller than ``roi``."""
    sl = tuple(slice(s, s + r) for s, r in zip(start, roi, strict=True))
    out = np.asarray(arr[(Ellipsis, *sl)])
    if out.shape[-3:] != tuple(roi):
        pad = [(0, 0)] * (out.ndim - 3) + [(0, r - d) for d, r in zip(out.shape[-3:], roi, strict=True)]
        out = np.pad(out, pad, constant_values=fill)
    return out


@dataclass
class _Indices:
    fg: np.ndarray  # flat indices of foreground voxels (all, or the store's sample)
    bg: np.ndarray | None  # flat indices of background voxels, or None: draw by rejection
    shape: tuple[int, ...]


class PosNegSampler:
    """Draw labelled crops from a pool of cases, ``pos:neg`` foreground:background centres.

    Args:
        cases: case keys (any hashable).
        load: ``load(key) -> (image (X, Y, Z) or (C, X, Y, Z), label (X, Y, Z)[, fg (K, 3) or None])``; arrays may
            be memory-mapped. ``fg`` is the store's sample of foreground positions: when given, the label is never
            scanned whole (background centres are drawn by rejection).
        roi: crop size (3 ints).
        pos, neg: ratio of foreground- to background-centred crops (reference 9:1).
        seed: RNG seed (the sampler's state is part of the checkpoint via :meth:`state_dict`).
    """

    def __init__(
        self,
        cases: Sequence,
        load: Callable[[object], tuple[np.ndarray, np.ndarray]],
        roi: Sequence[int],
        pos: float = 9.0,
        neg: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not cases:
            raise ValueError("PosNegSampler: no labelled cases to sample from")
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"PosNegSampler: pos/neg must be >= 0 and not both 0, got {pos}:{neg}")
        self.cases = list(cases)
        self.load = load
        self.roi = tuple(int(r) for r in roi)
        self.p_pos = pos / (pos + neg)
        self.rng = np.random.default_rng(seed)
        self._idx: dict[object, _Indices] = {}

    def _indices(self, key: object, label: np.ndarray, fg: np.ndarray | None) -> _Indices:
        got = self._idx.get(key)
        if got is None:
            shape = tuple(label.shape)
            if fg is not None and len(fg):
                got = _Indices(np.ravel_multi_index(tuple(np.asarray(fg).T), shape), None, shape)
            else:
                flat = np.asarray(label).ravel()
                got = _Indices(np.flatnonzero(flat > 0), np.flatnonzero(flat == 0), shape)
            self._idx[key] = got
        return got

    def _background(self, ind: _Indices, label: np.ndarray) -> int | None:
        if ind.bg is not None:
            return int(ind.bg[self.rng.integers(ind.bg.size)]) if ind.bg.size else None
        size = int(np.prod(ind.shape))
        for _ in range(64):
            flat = int(self.rng.integers(size))
            if label[np.unravel_index(flat, ind.shape)] == 0:
                return flat
        return None

    def center(self, ind: _Indices, label: np.ndarray) -> tuple[int, ...]:
        """A foreground centre with probability p_pos, else a background one (falls back when one set is empty)."""
        flat = None
        if self.rng.random() >= self.p_pos or not ind.fg.size:
            flat = self._background(ind, label)
        if flat is None:
            flat = int(ind.fg[self.rng.integers(ind.fg.size)]) if ind.fg.size else 0
        return tuple(int(v) for v in np.unravel_index(flat, ind.shape))

    def sample(self, n: int, key: object | None = None) -> tuple[np.ndarray, np.ndarray, list]:
        """``n`` crops (each from a uniformly drawn case unless ``key`` is given).

        Returns:
            images float32 (n, C, *roi), labels int64 (n, *roi), and the case key of each crop.
        """
        imgs, labs, keys = [], [], []
        for _ in range(n):
            k = key if key is not None else self.cases[int(self.rng.integers(len(self.cases)))]
            got = self.load(k)
            image, label = got[0], got[1]
            ind = self._indices(k, label, got[2] if len(got) > 2 else None)
            start = crop_start(self.center(ind, label), label.shape, self.roi)
            img = extract(image, start, self.roi).astype(np.float32)
            if img.ndim == 3:
                img = img[None]
            imgs.append(img)
            labs.append(extract(label, start, self.roi).astype(np.int64))
            keys.append(k)
        return np.stack(imgs), np.stack(labs), keys

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
