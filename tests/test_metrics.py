"""Segmentation / classification metrics: known geometry, edge cases, and agreement with MONAI's implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from voco.eval import metrics as M


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_dice_known_values():
    a = _cube((10, 10, 10), (0, 0, 0), (4, 4, 4))  # 64 voxels
    b = _cube((10, 10, 10), (2, 0, 0), (6, 4, 4))  # 64 voxels, overlap 32
    assert M.dice(a, b) == pytest.approx(2 * 32 / 128)
    assert M.dice(a, a) == 1.0
    assert M.dice(a, ~a) == 0.0


@pytest.mark.parametrize(
    "pred_empty,gt_empty,expected",
    [(True, True, (1.0, 0.0, 1.0)), (True, False, (0.0, math.nan, 0.0)), (False, True, (0.0, math.nan, 0.0))],
)
def test_empty_edge_cases(pred_empty, gt_empty, expected):
    full = _cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    empty = np.zeros((8, 8, 8), dtype=bool)
    p = empty if pred_empty else full
    g = empty if gt_empty else full
    d, h, n = M.dice(p, g), M.hd95(p, g, (1, 1, 1)), M.nsd(p, g, (1, 1, 1))
    assert d == expected[0]
    assert (math.isnan(h) and math.isnan(expected[1])) or h == expected[1]
    assert n == expected[2]


def test_hd95_shift_in_mm_with_anisotropic_spacing():
    a = _cube((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = np.roll(a, 3, axis=2)  # shifted 3 voxels along z
    # every surface voxel of the shifted faces is 3 voxels = 3 * 2.5 mm away; >5% of the surface is on those faces
    assert M.hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(7.5)
    assert M.hd95(a, a, (1.0, 1.0, 2.5)) == 0.0
    # NSD: within 2 mm only the side faces (z distance 0) match; within 8 mm everything matches
    assert M.nsd(a, b, (1.0, 1.0, 2.5), tolerance=8.0) == 1.0
    # at 2 mm: the share of surface voxels within 2 mm of the other surface, counted from the definition directly
    from scipy.spatial.distance import cdist

    def surface_points(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0)) * np.array([1.0, 1.0, 2.5])

    sa, sb = surface_points(a), surface_points(b)
    d = cdist(sa, sb)
    expected = ((d.min(1) <= 2.0).sum() + (d.min(0) <= 2.0).sum()) / (len(sa) + len(sb))
    assert 0.0 < expected < 1.0 and M.nsd(a, b, (1.0, 1.0, 2.5), tolerance=2.0) == pytest.approx(expected)


def test_mask_touching_the_border_has_a_surface_there():
    a = _cube((6, 6, 6), (0, 0, 0), (6, 6, 6))  # the whole volume: every border voxel is surface
    b = _cube((6, 6, 6), (0, 0, 0), (6, 6, 3))
    assert M.hd95(a, b, (1, 1, 1)) == pytest.approx(3.0)


def _blob(rng, shape, n):
    m = np.zeros(shape, dtype=bool)
    for _ in range(n):
        c = rng.integers(6, np.array(shape) - 6)
        m[tuple(slice(int(x) - 4, int(x) + 4) for x in c)] = True
    return ndimage.binary_opening(m | (rng.random(shape) > 0.995))


def test_agrees_with_monai():
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(0)
    shape = (40, 36, 30)
    spacing = (1.5, 0.8, 3.0)
    for _ in range(3):
        p, g = _blob(rng, shape, 4), _blob(rng, shape, 4)
        ours_h = M.hd95(p, g, spacing)
        ours_n = M.nsd(p, g, spacing, tolerance=2.0)
        import torch

        pt = torch.from_numpy(p)[None, None].float()
        gt = torch.from_numpy(g)[None, None].float()
        ref_h = float(compute_hausdorff_distance(pt, gt, percentile=95, spacing=list(spacing)))
        ref_n = float(compute_surface_dice(pt, gt, class_thresholds=[2.0], spacing=list(spacing), include_background=True))
        assert ours_h == pytest.approx(ref_h, rel=1e-5)
        assert ours_n == pytest.approx(ref_n, rel=1e-5)


def test_segmentation_metrics_and_summary():
    gt = np.zeros((12, 12, 12), dtype=np.uint8)
    gt[1:5, 1:5, 1:5] = 1
    gt[7:11, 7:11, 7:11] = 2
    pred = gt.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    per = M.segmentation_metrics(pred, gt, {0: "background", 1: "liver", 2: "spleen"}, (1, 1, 1))
    assert set(per) == {"liver", "spleen"}
    assert per["liver"] == {"dice": 1.0, "dice_all_classes": 1.0, "hd95": 0.0, "nsd": 1.0}
    assert per["spleen"]["dice"] == 0.0 and math.isnan(per["spleen"]["hd95"])
    s = M.summarise([per, per])
    assert s["mean"]["dice"] == pytest.approx(0.5)
    assert s["mean"]["hd95"] == 0.0  # HD95 averages the defined values ...
    assert s["mean"]["hd95_undefined"] == 2  # ... and counts the undefined ones
    with pytest.raises(ValueError, match="shape"):
        M.segmentation_metrics(pred[:-1], gt, {1: "liver"}, (1, 1, 1))


def test_dice_ignores_classes_absent_from_the_truth():
    """MONAI DiceMetric(ignore_empty=True): a class absent from the ground truth is not scored (nan, out of the mean),
    whether or not it is predicted; ``dice_all_classes`` keeps the other convention (absent from both = 1, predicted
    but absent = 0).

    Case 1: liver perfect, spleen absent from truth and prediction, kidney absent from truth but predicted:
    dice = mean(1.0) = 1.0; dice_all_classes = mean(1.0, 1.0, 0.0) = 2/3.
    Case 2: liver half-overlapping (2*32/128 = 0.5), spleen present and missed (0), kidney absent from both:
    dice = mean(0.5, 0.0) = 0.25; dice_all_classes = mean(0.5, 0.0, 1.0) = 0.5.
    """
    labels = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
    gt1 = np.zeros((12, 12, 12), dtype=np.uint8)
    gt1[1:5, 1:5, 1:5] = 1
    pred1 = gt1.copy()
    pred1[8:10, 8:10, 8:10] = 3
    per1 = M.segmentation_metrics(pred1, gt1, labels, (1, 1, 1))
    assert per1["liver"]["dice"] == 1.0
    assert math.isnan(per1["spleen"]["dice"]) and per1["spleen"]["dice_all_classes"] == 1.0
    assert math.isnan(per1["kidney"]["dice"]) and per1["kidney"]["dice_all_classes"] == 0.0
    gt2 = np.zeros((12, 12, 12), dtype=np.uint8)
    gt2[0:4, 0:4, 0:4] = 1
    gt2[7:11, 7:11, 7:11] = 2
    pred2 = np.zeros_like(gt2)
    pred2[2:6, 0:4, 0:4] = 1
    per2 = M.segmentation_metrics(pred2, gt2, labels, (1, 1, 1))
    assert per2["liver"]["dice"] == pytest.approx(0.5) and per2["spleen"]["dice"] == 0.0
    assert math.isnan(per2["kidney"]["dice"]) and per2["kidney"]["dice_all_classes"] == 1.0
    s = M.summarise([per1, per2])
    assert s["mean"]["dice"] == pytest.approx((1.0 + 0.25) / 2)
    assert s["mean"]["dice_all_classes"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert s["kidney"]["dice_unscored"] == 2 and s["spleen"]["dice_unscored"] == 1 and s["mean"]["dice_unscored"] == 3
    assert math.isnan(s["kidney"]["dice"]) and s["spleen"]["dice"] == 0.0  # per class: over the cases that have it
    # MONAI's own DiceMetric agrees on the headline per-class values
    import torch
    from monai.metrics import DiceMetric

    def onehot(a):
        return torch.nn.functional.one_hot(torch.from_numpy(a.astype(np.int64)), 4).movedim(-1, 0)[None].float()

    ref = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    for pred, gt, per in ((pred1, gt1, per1), (pred2, gt2, per2)):
        vals = ref(onehot(pred), onehot(gt))[0].tolist()
        ours = [per[n]["dice"] for n in ("liver", "spleen", "kidney")]
        for a, b in zip(ours, vals, strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def test_classification_metrics():
    assert M.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert M.binary_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.binary_auc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)  # ties count half
    assert math.isnan(M.binary_auc([1, 1], [0.2, 0.3]))
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    assert M.multiclass_auc([0, 1, 2, 0], probs) == pytest.approx(1.0)
    two = np.array([[0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    assert M.multiclass_auc([0, 1, 1], two) == pytest.approx(0.5)
