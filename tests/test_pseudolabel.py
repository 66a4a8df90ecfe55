"""Pseudo-labelling between the omni stages: sharding, confidence, listing of dropped volumes, summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from voco.errors import DataError
from voco.omni.pseudolabel import label_volume, shard_ids, summarise


def test_shard_ids_partition_the_cases():
    ids = [f"c{i}" for i in range(7)]
    shards = [shard_ids(ids, k, 3) for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids) and shards[0] == ["c0", "c3", "c6"]
    assert shard_ids(ids, None, None) == ids
    with pytest.raises(DataError):
        shard_ids(ids, 3, 3)


class _Oracle(torch.nn.Module):
    """Logits that put class 2 where the image is bright (> 0.5), confidently; background elsewhere."""

    def forward(self, x):
        bright = (x > 0.5).float()
        return torch.cat([(1 - bright) * 5, torch.zeros_like(x), bright * 5], dim=1)


def test_label_volume_sliding_window_and_confidence():
    img = np.zeros((20, 18, 17), np.float32)
    img[4:9, 3:12, 5:15] = 1.0
    label, conf, n_fg, probs = label_volume(_Oracle(), img, (8, 8, 8), overlap=0.5)
    assert label.shape == img.shape and label.dtype == np.uint8
    assert np.array_equal(label == 2, img > 0.5) and n_fg == int((img > 0.5).sum())
    e5 = np.exp(5.0)
    assert conf == pytest.approx(e5 / (e5 + 2), rel=1e-4)
    assert probs.shape == (3, *img.shape)


def test_summarise_lists_dropped_and_averages_dice():
    df = pd.DataFrame({
        "case_id": ["a", "b", "c"], "status": ["ok", "rejected", "ok"], "confidence": [0.9, 0.4, 0.8],
        "dice_full": [0.8, 0.2, 0.6],
        "dice_per_class": [json.dumps({"liver": 0.9, "spleen": 0.7}), json.dumps({"liver": 0.2}), json.dumps({"liver": 0.6})],
    })
    s = summarise(df, 0.5, trained=["liver"])
    assert s["kept"] == 2 and s["dropped_cases"] == ["b"]
    assert s["dice_per_class"]["liver"] == pytest.approx((0.9 + 0.2 + 0.6) / 3)
    assert s["dice_mean_kept"] == pytest.approx(0.7)
    assert s["dice_mean_trained_classes"] == pytest.approx(s["dice_per_class"]["liver"])
    # the threshold is chosen from a measured sweep: volumes kept and their mean trained-class Dice per threshold
    # (case Dice over the trained classes: a 0.9, b 0.2, c 0.6)
    sweep = {r["threshold"]: r for r in s["threshold_sweep"]}
    assert sweep[0.0]["kept"] == 3 and sweep[0.0]["dice_kept"] == pytest.approx((0.9 + 0.2 + 0.6) / 3)
    assert sweep[0.5]["kept"] == 2 and sweep[0.5]["dice_kept"] == pytest.approx(0.75)
    assert sweep[0.85]["kept"] == 1 and sweep[0.85]["dice_kept"] == pytest.approx(0.9)
    assert sweep[0.95]["kept"] == 0 and sweep[0.95]["dice_kept"] is None
    assert s["dice_mean_trained_classes_kept"] == pytest.approx(0.75)
