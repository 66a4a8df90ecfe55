"""``voco convert``: DICOM / MSD / nnU-Net / AbdomenAtlas inputs -> MSD dataset.json (+ NIfTI where converted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from voco.cli import main
from voco.data import phantom
from voco.data.catalog import read_dataset_json

REPO = Path(__file__).resolve().parents[1]


def _override(tmp_path: Path, cards: dict[str, dict]) -> Path:
    """Cards (phantom card id -> source.synthetic edits, or a full card dict under key 'card') in a tmp cards_dir."""
    d = tmp_path / "cards"
    d.mkdir(exist_ok=True)
    for cid, spec in cards.items():
        if "card" in spec:
            doc = spec["card"]
        else:
            doc = yaml.safe_load((REPO / "config" / "datasets" / f"{cid}.yaml").read_text())
            doc["source"]["synthetic"].update(spec)
        (d / f"{cid}.yaml").write_text(yaml.safe_dump(doc))
    ov = tmp_path / "override.yaml"
    ov.write_text(yaml.safe_dump({"cards_dir": str(d)}))
    return ov


def _save(arr: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path)


@pytest.mark.slow
def test_dicom_dataset_converts_with_labels_on_the_same_grid(tmp_path):
    ov = _override(tmp_path, {"phantom_src_b": {"n_cases": 3, "inplane_spacing": [0.9, 1.0]}})
    raw, out = tmp_path / "raw", tmp_path / "nifti"
    assert main(["synth", "--dataset", "phantom_src_b", "--out", str(raw), "--override", str(ov)]) == 0
    # break one case: drop a middle slice
    broken = sorted((raw / "dicom" / "phantom_src_b_001").iterdir())
    broken[len(broken) // 2].unlink()
    args = [
        "convert",
        "--input",
        str(raw),
        "--format",
        "dicom",
        "--dataset",
        "phantom_src_b",
        "--out",
        str(out),
        "--override",
        str(ov),
    ]
    assert main(args) == 0
    assert main([*args, "--strict"]) == 1
    report = json.loads((out / "convert_report.json").read_text())
    assert [f["case"] for f in report["failed"]] == ["phantom_src_b_001"]
    assert "missing slice" in report["failed"][0]["reason"] and report["n_ok"] == 2
    info = read_dataset_json(out / "dataset.json")
    assert info.region == "abdomen" and info.voco_dataset == "phantom_src_b" and info.labels[1] == "liver"
    assert [e.case_id for e in info.entries] == ["phantom_src_b_000", "phantom_src_b_002"]
    for e in info.entries:
        assert e.images[0].parent == (out / "imagesTr").resolve()
        img, lab, full = nib.load(e.images[0]), nib.load(e.label), nib.load(e.label_full)
        assert img.shape == lab.shape == full.shape
        assert np.array_equal(img.affine, lab.affine) and np.array_equal(img.affine, full.affine)
        a, f = np.asarray(img.dataobj), np.asarray(full.dataobj)
        assert 60 < a[f == phantom.LABEL_ID["liver"]].mean() < 140  # labels line up with the converted voxels
        assert a[f == phantom.LABEL_ID["spine"]].mean() > 180
    assert not list(out.glob("imagesTr/.*"))  # no temporary files left behind


def test_msd_input_is_referenced_not_copied(tmp_path):
    raw = tmp_path / "raw"
    _save(np.zeros((8, 8, 8), np.int16), raw / "imagesTr" / "a.nii.gz")
    _save(np.zeros((8, 8, 8), np.uint8), raw / "labelsTr" / "a.nii.gz")
    _save(np.zeros((8, 8, 8), np.int16), raw / "imagesTs" / "b.nii.gz")
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "name": "tiny",
                "labels": {"0": "background", "1": "liver"},
                "modality": {"0": "CT"},
                "training": [
                    {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
                    {"image": "./imagesTr/missing.nii.gz", "label": "./labelsTr/missing.nii.gz"},
                ],
                "test": ["./imagesTs/b.nii.gz"],
            }
        )
    )
    card = {
        "id": "tiny_msd",
        "region": "abdomen",
        "labels": {"0": "background", "1": "liver"},
        "source": {"kind": "local", "path": str(raw)},
    }
    ov = _override(tmp_path, {"tiny_msd": {"card": card}})
    out = tmp_path / "nifti"
    assert (
        main(
            [
                "convert",
                "--input",
                str(raw),
                "--format",
                "msd",
                "--dataset",
                "tiny_msd",
                "--out",
                str(out),
                "--override",
                str(ov),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["convert_report.json", "dataset.json"]
    doc = json.loads((out / "dataset.json").read_text())
    assert not os.path.isabs(doc["training"][0]["image"])
    assert (out / doc["training"][0]["image"]).resolve() == (raw / "imagesTr" / "a.nii.gz").resolve()
    assert doc["test"] == [{"image": os.path.relpath(raw / "imagesTs" / "b.nii.gz", out)}]
    assert doc["voco_dataset"] == "tiny_msd" and doc["region"] == "abdomen"
    report = json.loads((out / "convert_report.json").read_text())
    assert any("missing.nii.gz" in w for w in report["warnings"])  # kept: pre-processing rejects it by name


def test_nnunet_v2_folder_converts_to_msd_form(tmp_path):
    raw = tmp_path / "nn"
    for case in ("c1", "c2", "c3"):
        for ch in (0, 1):
            if case == "c3" and ch == 1:
                continue  # c3 lacks its second channel
            _save(np.full((6, 6, 6), ch, np.int16), raw / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        if case != "c2":
            _save(np.ones((6, 6, 6), np.uint8), raw / "labelsTr" / f"{case}.nii.gz")
    _save(np.zeros((6, 6, 6), np.int16), raw / "imagesTs" / "t1_0000.nii.gz")
    _save(np.zeros((6, 6, 6), np.int16), raw / "imagesTs" / "t1_0001.nii.gz")
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT", "1": "CT_late"},
                "labels": {"background": 0, "tumour": 1},
                "numTraining": 3,
                "file_ending": ".nii.gz",
            }
        )
    )
    card = {"id": "tiny_nn", "region": "abdomen", "format": "nnunet", "source": {"kind": "local"}}
    ov = _override(tmp_path, {"tiny_nn": {"card": card}})
    out = tmp_path / "out"
    assert main(["convert", "--input", str(raw), "--dataset", "tiny_nn", "--out", str(out), "--override", str(ov)]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["labels"] == {"0": "background", "1": "tumour"} and doc["modality"] == {"0": "CT", "1": "CT_late"}
    assert len(doc["training"]) == 1 and len(doc["test"]) == 1
    imgs = doc["training"][0]["image"]
    assert [Path(p).name for p in imgs] == ["c1_0000.nii.gz", "c1_0001.nii.gz"]
    failed = {f["case"]: f["reason"] for f in json.loads((out / "convert_report.json").read_text())["failed"]}
    assert set(failed) == {"c2", "c3"} and "label" in failed["c2"] and "c3_0001" in failed["c3"]
    info = read_dataset_json(out / "dataset.json")
    assert info.entries[0].case_id == "c1" and len(info.entries[0].images) == 2


def test_abdomenatlas_masks_are_merged_into_one_label_map(tmp_path):
    raw = tmp_path / "atlas"
    shape = (10, 9, 8)
    for case in ("BDMAP_001", "BDMAP_002"):
        _save(np.zeros(shape, np.int16), raw / case / "ct.nii.gz")
        liver = np.zeros(shape, np.uint8)
        liver[:5] = 1
        spleen = np.zeros(shape, np.uint8)
        spleen[4:7] = 1  # overlaps the liver in slab 4: the later class in the label map wins
        _save(liver, raw / case / "segmentations" / "liver.nii.gz")
        _save(spleen if case == "BDMAP_001" else spleen[:, :, :4], raw / case / "segmentations" / "spleen.nii.gz")
        _save(np.zeros(shape, np.uint8), raw / case / "segmentations" / "femur_left.nii.gz")
    card = {
        "id": "tiny_atlas",
        "region": "abdomen",
        "format": "abdomenatlas",
        "labels": {"0": "background", "1": "liver", "2": "spleen", "3": "aorta"},
        "source": {"kind": "local"},
    }
    ov = _override(tmp_path, {"tiny_atlas": {"card": card}})
    out = tmp_path / "out"
    assert (
        main(["convert", "--input", str(raw), "--dataset", "tiny_atlas", "--out", str(out), "--override", str(ov)]) == 0
    )
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "aorta"}
    assert len(doc["training"]) == 1 and doc["training"][0]["case_id"] == "BDMAP_001"
    lab = np.asarray(nib.load(out / doc["training"][0]["label"]).dataobj)
    assert lab[:4].max() == 1 and (lab[4:7] == 2).all() and lab[7:].max() == 0
    assert (out / doc["training"][0]["image"]).resolve() == (raw / "BDMAP_001" / "ct.nii.gz").resolve()
    report = json.loads((out / "convert_report.json").read_text())
    assert report["failed"][0]["case"] == "BDMAP_002" and "shape" in report["failed"][0]["reason"]
    assert any("femur_left" in w for w in report["warnings"]) and any("aorta" in w for w in report["warnings"])


def test_nothing_convertible_exits_2_with_the_reason(tmp_path, capsys):
    raw = tmp_path / "raw" / "dicom" / "case0"
    raw.mkdir(parents=True)
    (raw / "x").write_bytes(b"not dicom at all" * 20)
    card = {"id": "tiny_dcm", "region": "chest", "format": "dicom", "source": {"kind": "local"}}
    ov = _override(tmp_path, {"tiny_dcm": {"card": card}})
    rc = main(
        [
            "convert",
            "--input",
            str(tmp_path / "raw"),
            "--dataset",
            "tiny_dcm",
            "--out",
            str(tmp_path / "o"),
            "--override",
            str(ov),
        ]
    )
    assert rc == 2 and "no DICOM image slices" in capsys.readouterr().err
    assert not (tmp_path / "o" / "dataset.json").exists()
    assert json.loads((tmp_path / "o" / "convert_report.json").read_text())["failed"][0]["case"] == "case0"


# ------------------------------------------------------------------------------- one series, one verdict; safe ids
def _series(raw: Path, case: str, seed: int = 0) -> None:
    from voco.data import dicom

    rng = np.random.default_rng(seed)
    vol = rng.integers(-200, 300, size=(12, 10, 6)).astype(np.int16)
    dicom.write_series(vol, np.diag([0.8, 0.8, 2.0, 1.0]), raw / "dicom" / case, case_id=case, seed=seed)


def _strip(path: Path, *tags: str) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for t in tags:
        delattr(ds, t)
    ds.save_as(path)


def _dicom_card(tmp_path: Path, cid: str = "tiny_dcm") -> Path:
    card = {"id": cid, "region": "chest", "format": "dicom", "source": {"kind": "local"}}
    return _override(tmp_path, {cid: {"card": card}})


def test_dicom_slice_without_spacing_or_rows_rejects_that_series_only(tmp_path):
    raw = tmp_path / "raw"
    for i, case in enumerate(("ok_a", "no_spacing", "no_rows", "ok_b")):
        _series(raw, case, seed=i)
    _strip(sorted((raw / "dicom" / "no_spacing").iterdir())[2], "PixelSpacing")
    _strip(sorted((raw / "dicom" / "no_rows").iterdir())[0], "Rows")
    out = tmp_path / "nifti"
    args = ["convert", "--input", str(raw), "--dataset", "tiny_dcm", "--out", str(out), "--override",
            str(_dicom_card(tmp_path))]
    assert main(args) == 0
    report = json.loads((out / "convert_report.json").read_text())
    failed = {f["case"]: f["reason"] for f in report["failed"]}
    assert set(failed) == {"no_spacing", "no_rows"} and report["n_ok"] == 2
    assert failed["no_spacing"].startswith("DicomError: ") and "no PixelSpacing" in failed["no_spacing"]
    assert "no Rows" in failed["no_rows"] and str(raw / "dicom" / "no_rows") in failed["no_rows"]
    doc = json.loads((out / "dataset.json").read_text())
    assert [Path(e["image"]).name for e in doc["training"]] == ["ok_a.nii.gz", "ok_b.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["ok_a.nii.gz", "ok_b.nii.gz"]
    # the failures travel on as rejected rows of the manifest (no case disappears without a verdict)
    assert {r["case"] for r in doc["voco_rejected"]} == {"no_spacing", "no_rows"}
    ov = tmp_path / "prep.yaml"
    ov.write_text(yaml.safe_dump({"cards_dir": str(tmp_path / "cards"), "preprocess": {"roi": [8, 8, 8]}}))
    prep = tmp_path / "prep"
    assert main(["preprocess", "--dataset-json", str(out / "dataset.json"), "--out", str(prep), "--override",
                 str(ov)]) == 0
    import pandas as pd

    mf = pd.read_parquet(prep / "manifest.parquet").set_index("case_id")
    assert list(mf.loc[["ok_a", "ok_b"], "status"]) == ["ok", "ok"]
    assert mf.loc["no_rows", "status"] == "rejected" and "no Rows" in mf.loc["no_rows", "reason"]


def test_hostile_case_ids_in_convert_never_write_outside_the_output(tmp_path):
    raw = tmp_path / "raw"
    _series(raw, "c0")
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("must survive")
    hostile = ["../../sentinel/evil", "../../../x", str(sentinel / "abs"), "a\x00b", "y" * 300, "a/b", ".hidden"]
    entries = [{"image": "dicom/c0", "case_id": "c0"}] + [{"image": "dicom/c0", "case_id": h} for h in hostile]
    (raw / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "training": entries}))
    out = tmp_path / "out" / "nifti"
    args = ["convert", "--input", str(raw), "--dataset", "tiny_dcm", "--out", str(out), "--override",
            str(_dicom_card(tmp_path))]
    assert main(args) == 0
    report = json.loads((out / "convert_report.json").read_text())
    assert [f["case"] for f in report["failed"]] == hostile
    assert all(f["reason"].startswith("UnsafePathError: ") for f in report["failed"])
    assert sorted(p.name for p in sentinel.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cards", "out", "override.yaml", "raw", "sentinel"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nifti"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["c0.nii.gz"]
    # MSD layout: a hostile case_id is refused too (it would become a store path later)
    msd = tmp_path / "msd"
    _save(np.zeros((8, 8, 8), np.int16), msd / "imagesTr" / "a.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "training": [
        {"image": "imagesTr/a.nii.gz"}, {"image": "imagesTr/a.nii.gz", "case_id": "../.."}]}))
    card = {"id": "tiny_msd", "region": "abdomen", "source": {"kind": "local"}}
    ov = _override(tmp_path, {"tiny_msd": {"card": card}})
    assert main(["convert", "--input", str(msd), "--format", "msd", "--dataset", "tiny_msd", "--out",
                 str(tmp_path / "msd_out"), "--override", str(ov)]) == 0
    failed = json.loads((tmp_path / "msd_out" / "convert_report.json").read_text())["failed"]
    assert [f["case"] for f in failed] == ["training[1]"] and "'../..'" in failed[0]["reason"]
