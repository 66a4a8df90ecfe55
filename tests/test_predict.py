"""``voco predict``: new scans (NIfTI files, DICOM series) -> masks in their original geometry, equal to what
``voco evaluate`` scores for the same case; bad scans are reported per file and the rest go on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from voco.cli import main as voco
from voco.eval import metrics as M
from voco.eval.predict import find_scans


def _mask_matches_input(mask: Path, scan: Path) -> nib.Nifti1Image:
    m, s = nib.load(mask), nib.load(scan)
    assert m.shape == s.shape[:3]
    np.testing.assert_array_equal(m.affine, s.affine)
    return m


def _dice_rows(res: Path, case: str) -> dict[str, float]:
    cases = pd.read_csv(res / "cases.csv")
    rows = cases[(cases["case_id"] == case) & (cases["space"] == "original") & (cases["class"] != "mean")]
    return dict(zip(rows["class"], rows["dice"], strict=True))


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """A phantom organ task: synthesised, pre-processed, fine-tuned (cnn_small, 20 steps) and evaluated."""
    root = tmp_path_factory.mktemp("phantom_predict")
    raw, nifti, prep, run, res = (root / n for n in ("raw", "nifti", "prep", "run", "res"))
    assert voco(["synth", "--dataset", "phantom_organs", "--out", str(raw), "--n-cases", "4"]) == 0
    assert voco(["convert", "--input", str(raw), "--dataset", "phantom_organs", "--out", str(nifti)]) == 0
    assert voco(["preprocess", "--dataset-json", str(nifti / "dataset.json"), "--out", str(prep),
                 "--dataset", "phantom_organs", "--region", "abdomen"]) == 0
    assert voco(["finetune", "--dataset", "phantom_organs", "--init", "scratch", "--prep", str(prep),
                 "--out", str(run), "--steps", "20"]) == 0
    assert voco(["evaluate", "--dataset", "phantom_organs", "--run", str(run), "--prep", str(prep),
                 "--out", str(res), "--save-predictions"]) == 0
    return {"nifti": nifti, "prep": prep, "run": run, "res": res}


def _source_of(prep: Path, case: str) -> Path:
    man = pd.read_parquet(prep / "manifest.parquet")
    return Path(man.set_index("case_id").loc[case, "source"])


@pytest.mark.slow
def test_phantom_scan_mask_equals_the_evaluated_prediction(phantom_run, tmp_path):
    record = json.loads((phantom_run["run"] / "run.json").read_text())
    case = (record["test_ids"] or record["val_ids"])[0]
    scan = _source_of(phantom_run["prep"], case)
    out = tmp_path / "masks"
    assert voco(["predict", "-i", str(scan), "-o", str(out), "--run", str(phantom_run["run"])]) == 0
    mask_img = _mask_matches_input(out / f"{case}.nii.gz", scan)
    mask = np.asanyarray(mask_img.dataobj)
    evaluated = np.asanyarray(nib.load(phantom_run["res"] / "predictions" / f"{case}.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, evaluated)
    # Dice of the mask against the original label file = the run's own original-space evaluation of this case
    label_file = json.loads((phantom_run["nifti"] / "dataset.json").read_text())
    lab_rel = next(e["label"] for s in ("training", "test") for e in label_file.get(s, [])
                   if Path(e["image"]).name == scan.name)
    gt = np.rint(np.asanyarray(nib.load(phantom_run["nifti"] / lab_rel).dataobj)).astype(int)
    labels = {int(k): v for k, v in record["labels"].items() if int(k)}
    reported = _dice_rows(phantom_run["res"], case)
    for k, name in labels.items():
        d = M.dice(mask == k, gt == k)
        assert (np.isnan(d) and np.isnan(reported[name])) or abs(d - reported[name]) <= 1e-6, (name, d, reported)
    report = json.loads((out / "predict.json").read_text())
    assert report["n_ok"] == 1 and report["preprocess"]["spacing"] == record["preprocess"]["spacing"]


@pytest.mark.slow
def test_real_ct_mask_equals_the_evaluated_prediction(totalseg_run, tmp_path):
    """The real TotalSegmentator CT (30-slice crop, the smoke task's test case): mask on the CT's own grid, Dice
    against the original label equal to the evaluation's original-space Dice."""
    scan = totalseg_run["nifti"] / "imagesTr" / "ts_c.nii.gz"
    out = tmp_path / "ts_c_mask.nii.gz"  # a single scan may name its mask file
    assert voco(["predict", "-i", str(scan), "-o", str(out), "--run", str(totalseg_run["run"])]) == 0
    mask = np.asanyarray(_mask_matches_input(out, scan).dataobj)
    evaluated = np.asanyarray(nib.load(totalseg_run["res"] / "predictions" / "ts_c.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, evaluated)
    gt = np.asanyarray(nib.load(totalseg_run["nifti"] / "labelsTr" / "ts_c.nii.gz").dataobj)
    reported = _dice_rows(totalseg_run["res"], "ts_c")
    for k, name in {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "liver"}.items():
        d = M.dice(mask == k, gt == k)
        assert (np.isnan(d) and np.isnan(reported[name])) or abs(d - reported[name]) <= 1e-6, (name, d, reported)
    assert (mask == 4).sum() > 0  # the liver is found (as the evaluation test checks)


@pytest.mark.slow
def test_dicom_series_and_bad_scans_in_one_folder(totalseg_run, tmp_path):
    """A folder with a DICOM series sub-folder, a good NIfTI, a truncated NIfTI and a 2-D NIfTI: the good ones are
    segmented (the DICOM mask on dicom2nifti's grid), the bad ones are reported by file name, the rest goes on."""
    ref = totalseg_run["ref"]
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copytree(ref / "example_ct_dicom", inp / "series_a")
    shutil.copy(ref / "example_ct.nii.gz", inp / "full_ct.nii.gz")
    (inp / "broken.nii.gz").write_bytes((ref / "example_ct.nii.gz").read_bytes()[:5000])
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), inp / "flat.nii.gz")
    assert [s.name for s in find_scans(inp)] == ["broken", "flat", "full_ct", "series_a"]
    out = tmp_path / "out"
    assert voco(["predict", "-i", str(inp), "-o", str(out), "--run", str(totalseg_run["run"])]) == 0
    report = json.loads((out / "predict.json").read_text())
    by = {s["name"]: s for s in report["scans"]}
    assert by["full_ct"]["status"] == "ok" and by["series_a"]["status"] == "ok"
    assert by["broken"]["status"] == "failed" and "broken.nii.gz" in by["broken"]["reason"]
    assert by["flat"]["status"] == "failed" and "2-D" in by["flat"]["reason"]
    assert not (out / "broken.nii.gz").exists()
    _mask_matches_input(out / "full_ct.nii.gz", ref / "example_ct.nii.gz")
    dcm_mask = nib.load(out / "series_a.nii.gz")
    dcm_ref = nib.load(ref / "example_seg_dicom.nii.gz")  # TotalSegmentator's label on dicom2nifti's grid
    assert dcm_mask.shape == dcm_ref.shape
    np.testing.assert_allclose(dcm_mask.affine, dcm_ref.affine, atol=1e-3)
    # --strict turns the reported failures into exit status 1
    assert voco(["predict", "-i", str(inp), "-o", str(tmp_path / "o2"), "--run", str(totalseg_run["run"]),
                 "--strict"]) == 1


def test_missing_or_empty_input_is_a_clear_error(tmp_path):
    from voco.errors import DataError

    with pytest.raises(DataError, match="input not found"):
        find_scans(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="no NIfTI file"):
        find_scans(tmp_path / "notes")


def test_input_kinds_are_found(totalseg_ref, tmp_path):
    """One series folder is one scan; a folder of NIfTI files and series sub-folders lists each; same names kept apart."""
    series = find_scans(totalseg_ref / "example_ct_dicom")
    assert [(s.name, s.kind) for s in series] == [("example_ct_dicom", "dicom")]
    one = find_scans(totalseg_ref / "example_ct.nii.gz")
    assert [(s.name, s.kind) for s in one] == [("example_ct", "nifti")]
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "a.nii.gz").write_bytes(b"")
    assert [s.name for s in find_scans(tmp_path)] == ["a", "a_1"]
