"""Evaluation: a real-data smoke task (TotalSegmentator's real CT, a few classes) fine-tuned and evaluated end to end,
with the original-geometry path checked against the original files."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from voco.errors import DataError
from voco.eval import metrics as M
from voco.eval.evaluate import eval_ids


@pytest.mark.slow
def test_real_ct_smoke_task_outputs(totalseg_run):
    run, res = totalseg_run["run"], totalseg_run["res"]
    # exactly the rule's outputs (+ TensorBoard events and the DVC tracking files): the resumable checkpoints are
    # removed once these exist
    assert sorted(p.name for p in run.iterdir()
                  if not p.name.startswith("events.out.tfevents.") and p.name != "tracking") == ["metrics.jsonl", "model.pt", "progress.png", "run.json",
                                                      "transfer.json"]
    record = json.loads((run / "run.json").read_text())
    assert record["train_ids"] == ["ts_a", "ts_b"] and record["test_ids"] == ["ts_c"]
    assert json.loads((run / "transfer.json").read_text())["loaded"] == []  # scratch
    s = json.loads((res / "summary.json").read_text())
    assert s["split"] == "test" and s["n_cases"] == 1 and s["overlap"] == 0.5  # the laptop config's overlap
    assert s["device"] == "cpu"  # --device auto without a GPU
    names = {"spleen", "kidney_right", "kidney_left", "liver"}
    for space in ("resampled", "original"):
        per = s["metrics"][space]
        assert names | {"mean"} == set(per)
        for metric in ("dice", "nsd"):  # the mean row is the mean over the classes scored
            vals = [per[c][metric] for c in names if per[c][metric] is not None]
            assert vals and per["mean"][metric] == pytest.approx(float(np.mean(vals)))
    assert s["primary"] == {"name": "dice", "space": "original", "value": s["metrics"]["original"]["mean"]["dice"]}
    # 60 steps on two real cases already find the liver (the largest organ) on the test case
    assert s["metrics"]["original"]["liver"]["dice"] > 0.3


@pytest.mark.slow
def test_original_geometry_prediction_matches_reported_metrics(totalseg_run):
    """The saved prediction sits on the original CT's grid, and Dice / HD95 recomputed from the files match cases.csv."""
    res, nifti = totalseg_run["res"], totalseg_run["nifti"]
    pred_img = nib.load(res / "predictions" / "ts_c.nii.gz")
    ct = nib.load(nifti / "imagesTr" / "ts_c.nii.gz")
    assert pred_img.shape == ct.shape
    np.testing.assert_allclose(pred_img.affine, ct.affine, atol=1e-4)
    pred = np.asanyarray(pred_img.dataobj)
    gt = np.asanyarray(nib.load(nifti / "labelsTr" / "ts_c.nii.gz").dataobj)
    cases = pd.read_csv(res / "cases.csv")
    row = cases[(cases["space"] == "original") & (cases["class"] == "liver")].iloc[0]
    assert M.dice(pred == 4, gt == 4) == pytest.approx(row["dice"])
    h = M.hd95(pred == 4, gt == 4, ct.header.get_zooms()[:3])
    assert (math.isnan(h) and math.isnan(row["hd95"])) or h == pytest.approx(row["hd95"])
    # one row per case x space x class (+ the mean row)
    assert len(cases) == 2 * 5


def test_eval_ids_choice_and_error():
    rec = {"dataset": "d", "eval_split": "val", "test_ids": [], "val_ids": ["a", "b"]}
    assert eval_ids(rec) == ("val", ["a", "b"])
    with pytest.raises(DataError, match="no test cases"):
        eval_ids(rec, "test")
