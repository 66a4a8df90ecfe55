"""Pure array functions on label maps shared by VoComni curation, pseudo-labelling and the omni stages.

They live here (not in :mod:`voco.omni.curation`) so that :mod:`voco.omni.pseudolabel` and :mod:`voco.omni.stage` can
use them without importing the curation module, which imports both of them.
"""

from __future__ import annotations

import numpy as np

from voco.errors import DataError


def map_label(label: np.ndarray, lut: np.ndarray, where: str = "label") -> np.ndarray:
    """Map a source label volume through ``lut`` (uint8 output, same shape).

    Raises:
        DataError: the label holds a value the source's label map does not list.
    """
    lab = np.asarray(label)
    if lab.size == 0:
        return lab.astype(np.uint8)
    hi = int(lab.max())
    if hi >= len(lut) or int(lab.min()) < 0:
        raise DataError(f"{where}: label value {hi} is not in the label map (values 0..{len(lut) - 1})")
    return lut[lab.astype(np.intp, copy=False)]


def confidence(probs: np.ndarray) -> tuple[float, int]:
    """Mean ensemble max-probability over the predicted-foreground voxels (argmax != 0).

    Returns:
        (confidence, number of foreground voxels); confidence is 0.0 when nothing is predicted as foreground.
    """
    pred = np.argmax(probs, axis=0)
    fg = pred > 0
    n = int(fg.sum())
    if n == 0:
        return 0.0, 0
    return float(probs.max(axis=0)[fg].mean()), n


def per_class_dice(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of every class 0..n_classes-1 in one pass (confusion matrix); NaN where a class is absent from both."""
    if pred.shape != gt.shape:
        raise ValueError(f"per_class_dice: shapes differ {pred.shape} vs {gt.shape}")
    p = pred.astype(np.int64, copy=False).ravel()
    g = gt.astype(np.int64, copy=False).ravel()
    cm = np.bincount(p * n_classes + g, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    inter = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), np.nan)
    return d
