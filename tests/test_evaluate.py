"""Evaluation: a real-data smoke task (TotalSegmentator's real CT, a few classes) fine-tuned and evaluated end to end,
with the original-geometry path checked against the original files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from voco.cli import main as voco
from voco.errors import DataError
from voco.eval import metrics as M
from voco.eval.evaluate import eval_ids

# TotalSegmentator v2 class ids -> our smoke-task classes
TS_CLASSES = {1: (1, "spleen"), 2: (2, "kidney_right"), 3: (3, "kidney_left"), 5: (4, "liver")}


def _write_case(ref: Path, out: Path, name: str, flip: bool) -> tuple[str, str]:
    ct = nib.load(ref / "example_ct_sm.nii.gz")
    seg = nib.load(ref / "example_seg.nii.gz")
    img = np.asanyarray(ct.dataobj).astype(np.int16)
    src = np.asanyarray(seg.dataobj)
    lab = np.zeros(src.shape, dtype=np.uint8)
    for ts, (ours, _) in TS_CLASSES.items():
        lab[src == ts] = ours
    if flip:  # a second, different-looking case: mirrored along the first voxel axis (same geometry)
        img, lab = img[::-1].copy(), lab[::-1].copy()
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, ct.affine), out / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(lab, ct.affine), out / "labelsTr" / f"{name}.nii.gz")
    return f"imagesTr/{name}.nii.gz", f"labelsTr/{name}.nii.gz"


@pytest.fixture(scope="module")
def totalseg_run(totalseg_ref, tmp_path_factory):
    """A 3-case real-CT task (2 train, 1 test), pre-processed, fine-tuned 30 steps from scratch and evaluated."""
    root = tmp_path_factory.mktemp("totalseg_task")
    nifti = root / "nifti"
    entries = [_write_case(totalseg_ref, nifti, n, f) for n, f in [("ts_a", False), ("ts_b", True), ("ts_c", False)]]
    labels = {"0": "background", **{str(o): n for o, n in TS_CLASSES.values()}}
    doc = {
        "name": "totalseg_smoke", "labels": labels, "modality": {"0": "CT"}, "region": "abdomen",
        "training": [{"image": i, "label": lab} for i, lab in entries[:2]],
        "test": [{"image": entries[2][0], "label": entries[2][1]}],
    }
    (nifti / "dataset.json").write_text(json.dumps(doc))
    prep, run, res = root / "prep", root / "run", root / "res"
    assert voco(["preprocess", "--dataset-json", str(nifti / "dataset.json"), "--out", str(prep),
                 "--dataset", "totalseg_smoke", "--region", "abdomen"]) == 0
    assert voco(["finetune", "--dataset", "totalseg_smoke", "--init", "scratch", "--prep", str(prep),
                 "--out", str(run), "--steps", "30", "--seed", "0"]) == 0
    assert voco(["evaluate", "--dataset", "totalseg_smoke", "--run", str(run), "--prep", str(prep),
                 "--out", str(res), "--save-predictions"]) == 0
    return {"root": root, "nifti": nifti, "prep": prep, "run": run, "res": res, "ref": totalseg_ref}


@pytest.mark.slow
def test_real_ct_smoke_task_outputs(totalseg_run):
    run, res = totalseg_run["run"], totalseg_run["res"]
    for f in ("model.pt", "run.json", "transfer.json", "metrics.jsonl", "progress.png", "final.pt"):
        assert (run / f).is_file(), f
    record = json.loads((run / "run.json").read_text())
    assert record["train_ids"] == ["ts_a", "ts_b"] and record["test_ids"] == ["ts_c"]
    assert json.loads((run / "transfer.json").read_text())["loaded"] == []  # scratch
    s = json.loads((res / "summary.json").read_text())
    assert s["split"] == "test" and s["n_cases"] == 1 and s["overlap"] == 0.5  # the laptop config's overlap
    names = {"spleen", "kidney_right", "kidney_left", "liver"}
    for space in ("resampled", "original"):
        per = s["metrics"][space]
        assert names | {"mean"} == set(per)
        for c in names:
            assert 0.0 <= per[c]["dice"] <= 1.0 and 0.0 <= per[c]["nsd"] <= 1.0
    assert s["primary"] == {"name": "dice", "space": "original", "value": s["metrics"]["original"]["mean"]["dice"]}
    # 30 steps on two real cases already find the liver (the largest organ) on the test case
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
