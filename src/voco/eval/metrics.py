"""Segmentation and classification metrics (pure numpy / scipy; no torch).

Segmentation metrics compare two binary masks of the same shape (X, Y, Z) with a voxel spacing in mm:

* ``dice``: 2|P and G| / (|P| + |G|).
* ``hd95``: the 95th percentile Hausdorff distance in mm, computed like MONAI's ``compute_hausdorff_distance``
  (percentile 95, not directed): the larger of the two directed 95th percentiles of surface-to-surface distances.
* ``nsd``: normalised surface Dice (Nikolov et al. 2021) at a tolerance ``tau`` in mm: the fraction of surface voxels of
  either mask that lie within ``tau`` of the other mask's surface. Surfaces are counted in voxels (a mask voxel with a
  6-neighbour outside the mask, the volume border counting as outside), not in surfel areas, so the value is an
  approximation of the area-weighted definition that converges with resolution.

Distances use ``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing`` on the bounding box of both masks
(exact: every surface voxel lies inside that box).

Edge cases (defined here and tested in tests/test_metrics.py):

======================  ======  =======  =====
case                    dice    hd95     nsd
======================  ======  =======  =====
both masks empty        1.0     0.0      1.0
only one mask empty     0.0     nan      0.0
======================  ======  =======  =====

Per-class scores of a label map (:func:`segmentation_metrics`) report Dice twice:

* ``dice`` (the headline, MONAI ``DiceMetric(ignore_empty=True)`` as the paper's code uses it): a class absent from
  the ground truth is not scored (``nan``, left out of every mean), whatever the prediction;
* ``dice_all_classes`` (every listed class scored, :func:`dice` above): absent from both = 1.0, predicted but absent
  from the truth = 0.0.

HD95 is undefined (``nan``) when exactly one mask is empty: there is no surface to measure a distance to. Summaries
(:func:`summarise`) average HD95 over the cases where it is defined and report how many were undefined
(``hd95_undefined``), so one missed organ is visible in the count instead of turning the mean into ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

_STRUCT6 = ndimage.generate_binary_structure(3, 1)
#: per-class segmentation scores averaged by :func:`summarise`
SEG_KEYS = ("dice", "dice_all_classes", "hd95", "nsd")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks (any shape); 1.0 when both are empty."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"dice: shapes differ {p.shape} vs {g.shape}")
    s = int(p.sum()) + int(g.sum())
    if s == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / s


def dice_ignore_empty(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks, ``nan`` when the ground truth is empty (MONAI ``DiceMetric(ignore_empty=True)``)."""
    g = np.asarray(gt, dtype=bool)
    return math.nan if not g.any() else dice(pred, g)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one 6-neighbour outside it (outside the array counts as outside)."""
    if not mask.any():
        return mask.copy()
    eroded = ndimage.binary_erosion(mask, structure=_STRUCT6, border_value=0)
    return np.logical_and(mask, ~eroded)


def _bbox_crop(*masks: np.ndarray) -> tuple[slice, ...]:
    union = np.zeros(masks[0].shape, dtype=bool)
    for m in masks:
        union |= m
    idx = np.nonzero(union)
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface -> gt surface, gt surface -> pred surface).

    Args:
        pred, gt: binary masks (X, Y, Z), both non-empty.
        spacing: voxel size in mm (3 values).

    Returns:
        Two 1-D float arrays, one distance per surface voxel of ``pred`` and of ``gt``.
    """
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"surface_distances: shapes differ {p.shape} vs {g.shape}")
    if not p.any() or not g.any():
        raise ValueError("surface_distances: both masks must be non-empty")
    # Pad by one so the crop keeps the "outside counts as background" border rule of the full array.
    box = _bbox_crop(p, g)
    p = np.pad(p[box], 1)
    g = np.pad(g[box], 1)
    sp = _surface(p)
    sg = _surface(g)
    sampling = [float(s) for s in spacing]
    dt_g = ndimage.distance_transform_edt(~sg, sampling=sampling)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    return dt_g[sp], dt_p[sg]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], percentile: float = 95.0) -> float:
    """Percentile Hausdorff distance in mm (max of the two directed percentiles); see the module table for empties."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    pe, ge = not p.any(), not g.any()
    if pe and ge:
        return 0.0
    if pe or ge:
        return math.nan
    d_pg, d_gp = surface_distances(p, g, spacing)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance: float = 1.0) -> float:
    """Normalised surface Dice at ``tolerance`` mm (voxel-counted surfaces); see the module table for empties."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    pe, ge = not p.any(), not g.any()
    if pe and ge:
        return 1.0
    if pe or ge:
        return 0.0
    d_pg, d_gp = surface_distances(p, g, spacing)
    return float((np.sum(d_pg <= tolerance) + np.sum(d_gp <= tolerance)) / (d_pg.size + d_gp.size))


def segmentation_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    labels: dict[int, str],
    spacing: Sequence[float],
    nsd_tolerance: float = 1.0,
    percentile: float = 95.0,
) -> dict[str, dict[str, float]]:
    """Per-class Dice, HD95 and NSD of two label maps.

    Args:
        pred, gt: integer label maps (X, Y, Z) of the same shape.
        labels: label value -> class name for the foreground classes to score (background excluded).
        spacing: voxel size in mm.

    Returns:
        ``{class_name: {"dice": .., "dice_all_classes": .., "hd95": .., "nsd": ..}}``; ``dice`` is ``nan`` for a class
        absent from ``gt`` (see the module docstring).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"segmentation_metrics: prediction shape {pred.shape} != label shape {gt.shape}")
    out: dict[str, dict[str, float]] = {}
    for value, name in labels.items():
        if int(value) == 0:
            continue
        p = pred == int(value)
        g = gt == int(value)
        d = dice(p, g)
        out[name] = {
            "dice": d if g.any() else math.nan,
            "dice_all_classes": d,
            "hd95": hd95(p, g, spacing, percentile),
            "nsd": nsd(p, g, spacing, nsd_tolerance),
        }
    return out


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of equal entries; nan for no cases."""
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.size == 0:
        return math.nan
    return float(np.mean(t == p))


def binary_auc(y_true: Sequence[int], score: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); nan when one class is absent."""
    t = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=float)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    xs = x[order]
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def multiclass_auc(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes that have both positives and negatives (binary: the usual AUC).

    Args:
        y_true: class index per case (n,).
        probs: class probabilities (n, K).
    """
    t = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[0] != t.size:
        raise ValueError(f"multiclass_auc: probs shape {p.shape} does not fit {t.size} cases")
    if p.shape[1] == 2:
        return binary_auc(t == 1, p[:, 1])
    aucs = [binary_auc(t == k, p[:, k]) for k in range(p.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def nan_mean(values: Iterable[float]) -> float:
    """Mean of the finite values; nan when there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def summarise(per_case: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Average per-case class metrics (output of :func:`segmentation_metrics`) over cases, per class and overall.

    Returns ``{class: {"dice", "dice_all_classes", "hd95", "nsd", "hd95_undefined", "dice_unscored"}, "mean": {...}}``
    where "mean" averages each case's class-mean first (over the defined values: Dice over the classes present in that
    case's truth, ``dice_all_classes`` and NSD over all classes, HD95 over the defined ones). ``dice_unscored`` counts
    the (case, class) pairs whose class is absent from the truth.
    """
    classes: list[str] = []
    for c in per_case:
        for k in c:
            if k not in classes:
                classes.append(k)
    out: dict[str, dict[str, float]] = {}
    for k in classes:
        rows = [c[k] for c in per_case if k in c]
        out[k] = {m: nan_mean(r.get(m, r["dice"]) for r in rows) for m in SEG_KEYS}
        out[k]["hd95_undefined"] = int(sum(1 for r in rows if not math.isfinite(r["hd95"])))
        out[k]["dice_unscored"] = int(sum(1 for r in rows if not math.isfinite(r["dice"])))
    case_means = [{m: nan_mean(c[k].get(m, c[k]["dice"]) for k in c) for m in SEG_KEYS} for c in per_case if c]
    out["mean"] = {m: nan_mean(c[m] for c in case_means) for m in SEG_KEYS}
    out["mean"]["hd95_undefined"] = int(sum(out[k]["hd95_undefined"] for k in classes))
    out["mean"]["dice_unscored"] = int(sum(out[k]["dice_unscored"] for k in classes))
    return out
