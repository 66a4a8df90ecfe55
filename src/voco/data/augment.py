"""Augmentation of labelled training crops (SPEC 6): flips, x-y rot90, intensity scale and shift.

The same recipe serves fine-tuning and the supervised parts of pre-training (omni stages 1 and 2, SuPreM), MONAI's
BTCV recipe in our words: each axis flipped with probability ``flip_p``; an x-y rotation by k * 90 degrees (k in 1..3)
with probability ``rot90_p`` (square x-y crops only); the intensity scaled by ``1 + U(-intensity, intensity)`` and,
independently, shifted by ``U(-intensity, intensity)``, each with probability ``intensity_p``. Spatial transforms are
applied to the image and its label alike.

Settings are a mapping with those four keys (missing keys = 0, i.e. off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

KEYS = ("flip_p", "rot90_p", "intensity", "intensity_p")


def is_active(params: Mapping[str, Any] | None) -> bool:
    """True when ``params`` changes anything (a probability and, for intensity, a magnitude above 0)."""
    if not params:
        return False
    p = {k: float(params.get(k, 0.0) or 0.0) for k in KEYS}
    return p["flip_p"] > 0 or p["rot90_p"] > 0 or (p["intensity"] > 0 and p["intensity_p"] > 0)


def torch_seeded_rng() -> np.random.Generator:
    """A numpy Generator drawn from torch's global RNG (so the training loop's RNG checkpoint covers it)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


def augment_crops(
    x: torch.Tensor,
    y: torch.Tensor | None,
    params: Mapping[str, Any] | None,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment each crop of a batch independently.

    Args:
        x: (N, C, X, Y, Z) images.
        y: (N, 1, X, Y, Z) labels (or any (N, K, X, Y, Z) map moved with the image), or None.
        params: ``flip_p``, ``rot90_p``, ``intensity``, ``intensity_p`` (see the module docstring).
        rng: random source; default one drawn from torch's global RNG.

    Returns:
        (x', y') of the same shapes (y' None when y is None).
    """
    if not is_active(params):
        return x, y
    rng = rng if rng is not None else torch_seeded_rng()
    fp, rp = float(params.get("flip_p", 0.0)), float(params.get("rot90_p", 0.0))
    mag, ip = float(params.get("intensity", 0.0)), float(params.get("intensity_p", 0.0))
    xs, ys = [], []
    for i in range(x.shape[0]):
        xi = x[i]
        yi = y[i] if y is not None else None
        for ax in (1, 2, 3):
            if rng.random() < fp:
                xi = xi.flip(ax)
                yi = yi.flip(ax) if yi is not None else None
        if rng.random() < rp and xi.shape[1] == xi.shape[2]:
            k = int(rng.integers(1, 4))
            xi = torch.rot90(xi, k, (1, 2))
            yi = torch.rot90(yi, k, (1, 2)) if yi is not None else None
        if mag > 0 and rng.random() < ip:
            xi = xi * float(1.0 + rng.uniform(-mag, mag))
        if mag > 0 and rng.random() < ip:
            xi = xi + float(rng.uniform(-mag, mag))
        xs.append(xi.contiguous())
        if yi is not None:
            ys.append(yi.contiguous())
    return torch.stack(xs), (torch.stack(ys) if y is not None else None)
