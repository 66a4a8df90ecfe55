"""voco preprocess: real CT geometry, every kind of bad input, caching on content + parameters, shards + merge."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from voco.cli import main
from voco.data.store import Store, to_original

LPS = np.diag([-2.0, -2.0, 3.0, 1.0])


def _override(tmp: Path, spacing=(4.0, 4.0, 4.0), window=(-175, 250), roi=(16, 16, 16), name="ov.yaml") -> Path:
    p = tmp / name
    p.write_text(
        yaml.safe_dump(
            {
                "preprocess": {
                    "roi": list(roi),
                    "regions": {"abdomen": {"spacing": list(spacing), "window": list(window)}},
                }
            }
        )
    )
    return p


def _body(shape=(40, 36, 20), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like block: air around an ellipsoid 'body' (40 HU + noise) holding a 'liver' (label 1) and 'spleen' (2)."""
    rng = np.random.default_rng(seed)
    g = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    c = [(n - 1) / 2 for n in shape]
    r = sum(((g[i] - c[i]) / (0.42 * shape[i])) ** 2 for i in range(3))
    img = np.where(r < 1, 40.0, -1000.0) + rng.normal(0, 10, shape)
    lab = np.zeros(shape, np.uint8)
    lab[(r < 0.3) & (g[0] < c[0])] = 1
    lab[(r < 0.3) & (g[0] >= c[0])] = 2
    return img.astype(np.int16), lab


def _save(path: Path, data: np.ndarray, affine: np.ndarray = LPS) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path.relative_to(path.parent.parent))


def _run(dj: Path, out: Path, ov: Path, *extra: str) -> int:
    return main(["preprocess", "--dataset-json", str(dj), "--out", str(out), "--override", str(ov), *extra])


def _write_dataset(root: Path, training: list, test: list | None = None, **kw) -> Path:
    doc = {
        "name": "unit",
        "region": "abdomen",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "training": training,
        "test": test or [],
    }
    doc.update(kw)
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


# ------------------------------------------------------------------------------------------------------ real data
def test_real_ct_3mm_to_1_5mm_geometry_and_labels(totalseg_ref: Path, tmp_path: Path) -> None:
    ct, seg = totalseg_ref / "example_ct.nii.gz", totalseg_ref / "example_seg_fast_force_split.nii.gz"
    src = nib.load(ct)
    ref_seg = np.asanyarray(nib.load(seg).dataobj)
    labels = {str(i): f"class_{i}" for i in range(118)}  # TotalSegmentator v2 label values 0..117
    dj = tmp_path / "dataset.json"
    dj.write_text(
        json.dumps(
            {"name": "ts", "region": "abdomen", "labels": labels, "training": [{"image": str(ct), "label": str(seg)}]}
        )
    )
    ov = _override(tmp_path, spacing=(1.5, 1.5, 1.5), roi=(64, 64, 64))
    assert _run(dj, tmp_path / "prep", ov, "--strict") == 0
    store = Store(tmp_path / "prep")
    row = store.manifest.iloc[0]
    assert row["status"] == "ok", row["reason"]
    case = store.load("example_ct")
    m = case.meta
    assert src.shape == (122, 101, 112)
    assert m["resampled_shape"] == [244, 202, 224]  # 3 mm -> 1.5 mm doubles every axis
    res_aff = np.asarray(m["resampled_affine"])
    np.testing.assert_allclose(np.abs(np.diag(res_aff)[:3]), 1.5, atol=1e-6)
    np.testing.assert_allclose(res_aff[:3, 3], src.affine[:3, 3], atol=1e-4)  # origin preserved
    assert list(row["spacing"]) == [1.5, 1.5, 1.5]
    # the stored (cropped) grid maps its voxel 0 to the crop's world position
    np.testing.assert_allclose(np.asarray(m["affine"])[:3, 3], res_aff[:3, :3] @ m["crop_start"] + res_aff[:3, 3])
    assert case.image.dtype == np.float16 and 0 <= float(case.image.min()) and float(case.image.max()) <= 1
    assert case.label.dtype == np.uint8
    assert set(np.unique(case.label)) <= set(np.unique(ref_seg)) and int(case.label.max()) <= 117
    # nearest-neighbour labels go back to the original grid unchanged
    back = to_original(case.label, m, order=0)
    assert back.shape == ref_seg.shape
    assert float((back == ref_seg).mean()) > 0.999


def test_real_lps_mr_reorients_and_round_trips(totalseg_ref: Path, tmp_path: Path) -> None:
    mr, seg = totalseg_ref / "example_mr_sm.nii.gz", totalseg_ref / "example_seg_roi_subset_mr.nii.gz"
    assert nib.aff2axcodes(nib.load(mr).affine) == ("L", "P", "S")
    ref_img = np.asanyarray(nib.load(mr).dataobj).astype(np.float32)
    ref_seg = np.asanyarray(nib.load(seg).dataobj)
    dj = tmp_path / "dataset.json"
    dj.write_text(
        json.dumps(
            {
                "name": "mr",
                "region": "abdomen",
                "modality": {"0": "MR"},
                "labels": {str(i): str(i) for i in range(256)},
                "training": [{"image": str(mr), "label": str(seg)}],
            }
        )
    )
    assert _run(dj, tmp_path / "prep", _override(tmp_path, spacing=(3.0, 3.0, 3.0), roi=(8, 8, 8)), "--strict") == 0
    case = Store(tmp_path / "prep").load("example_mr_sm")
    assert nib.aff2axcodes(np.asarray(case.meta["affine"])) == ("R", "A", "S")
    # MR: non-zero voxels z-scored, background stays 0
    img = np.asarray(case.image, dtype=np.float32)
    assert abs(float(img[img != 0].mean())) < 0.05
    np.testing.assert_array_equal(to_original(case.label, case.meta), ref_seg)
    back = to_original(case.image, case.meta, order=1)
    assert back.shape == ref_img.shape
    np.testing.assert_array_equal(back != 0, (ref_img != 0) & (back != 0))  # foreground where the original has it


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_rejected_with_reasons_and_others_go_on(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    img, lab = _body()
    good = {
        "image": _save(root / "imagesTr" / "good.nii.gz", img),
        "label": _save(root / "labelsTr" / "good.nii.gz", lab),
        "label_full": _save(root / "labelsFull" / "good.nii.gz", lab),
        "class": 1,
    }
    hot = img.copy()
    hot[img > 0] = 30000  # extreme intensities: clipped by the window
    extreme = {"image": _save(root / "imagesTr" / "extreme.nii.gz", hot)}
    small_img, small_lab = _body((8, 8, 4))
    small = {
        "image": _save(root / "imagesTr" / "small.nii.gz", small_img),
        "label": _save(root / "labelsTr" / "small.nii.gz", small_lab),
    }
    # broken ones
    full = (root / "imagesTr" / "good.nii.gz").read_bytes()
    (root / "imagesTr" / "trunc.nii.gz").write_bytes(full[: len(full) // 2])
    (root / "imagesTr" / "empty.nii.gz").write_bytes(b"")
    (root / "imagesTr" / "text.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    nan = img.astype(np.float32)
    nan[3, 4, 5] = np.nan
    bad_lab = lab.copy()
    bad_lab[5, 5, 5] = 9
    shifted = LPS.copy()
    shifted[0, 3] += 5.0
    cases = {
        "trunc": {"image": "imagesTr/trunc.nii.gz"},
        "empty": {"image": "imagesTr/empty.nii.gz"},
        "text": {"image": "imagesTr/text.nii.gz"},
        "missing": {"image": "imagesTr/missing.nii.gz"},
        "nan": {"image": _save(root / "imagesTr" / "nan.nii.gz", nan)},
        "flat": {"image": _save(root / "imagesTr" / "flat.nii.gz", img[:, :, 0])},
        "four_d": {"image": _save(root / "imagesTr" / "four_d.nii.gz", np.stack([img, img], -1))},
        "shape": {
            "image": _save(root / "imagesTr" / "shape.nii.gz", img),
            "label": _save(root / "labelsTr" / "shape.nii.gz", lab[:-2]),
        },
        "affine": {
            "image": _save(root / "imagesTr" / "affine.nii.gz", img),
            "label": _save(root / "labelsTr" / "affine.nii.gz", lab, shifted),
        },
        "values": {
            "image": _save(root / "imagesTr" / "values.nii.gz", img),
            "label": _save(root / "labelsTr" / "values.nii.gz", bad_lab),
        },
        "air": {"image": _save(root / "imagesTr" / "air.nii.gz", np.full((20, 20, 20), -1000, np.int16))},
    }
    expect = {
        "trunc": "truncated",
        "empty": "empty file",
        "text": "not a readable NIfTI",
        "missing": "not found",
        "nan": "1 NaN",
        "flat": "2-D",
        "four_d": "4-D",
        "shape": "does not match the image shape",
        "affine": "affine does not match",
        "values": "label values 9 are not in",
        "air": "no foreground",
    }
    dj = _write_dataset(root, [good, *cases.values(), small], test=[extreme["image"]])
    ov = _override(tmp_path)
    out = tmp_path / "prep"
    assert _run(dj, out, ov) == 0
    assert _run(dj, out, ov, "--strict") == 1
    mf = pd.read_parquet(out / "manifest.parquet")
    assert len(mf) == 14 and set(mf["status"]) == {"ok", "rejected"}
    rows = mf.set_index("case_id")
    for cid, needle in expect.items():
        assert rows.loc[cid, "status"] == "rejected", cid
        assert needle in rows.loc[cid, "reason"], (cid, rows.loc[cid, "reason"])
        assert f"{cid}.nii.gz" in rows.loc[cid, "reason"]  # the reason names the file
    for cid in ("good", "small", "extreme"):
        assert rows.loc[cid, "status"] == "ok" and rows.loc[cid, "reason"] == ""
    assert list(rows.loc["good", ["split", "labelled", "class"]]) == ["train", True, 1]
    assert list(rows.loc["extreme", ["split", "labelled", "class"]]) == ["test", False, -1]
    store = Store(out)
    assert store.ids(split="train", labelled=True) == ["good", "small"]
    s = store.load("small")
    assert s.image.shape == (16, 16, 16) and s.label.shape == (16, 16, 16)  # padded up to the ROI
    e = np.asarray(store.load("extreme").image, np.float32)
    assert float(e.max()) == 1.0 and float(e.min()) == 0.0
    g = store.load("good")
    np.testing.assert_array_equal(np.asarray(g.label), np.asarray(g.label_full))  # label_full preprocessed alike


# --------------------------------------------------------------------------------------------- caching and shards
def _small_dataset(root: Path, n: int = 5) -> Path:
    entries = []
    for i in range(n):
        img, lab = _body(seed=i)
        entries.append(
            {
                "image": _save(root / "imagesTr" / f"c{i}.nii.gz", img),
                "label": _save(root / "labelsTr" / f"c{i}.nii.gz", lab),
            }
        )
    return _write_dataset(root, entries)


def test_outputs_keyed_on_content_and_parameters(tmp_path: Path) -> None:
    dj = _small_dataset(tmp_path / "ds", n=3)
    out = tmp_path / "prep"
    ov = _override(tmp_path)
    assert _run(dj, out, ov, "--strict") == 0
    first = pd.read_parquet(out / "manifest.parquet").set_index("case_id")
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("image.npy")}
    assert _run(dj, out, ov, "--strict") == 0  # same inputs: nothing recomputed
    again = pd.read_parquet(out / "manifest.parquet").set_index("case_id")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("image.npy")} == mtimes
    pd.testing.assert_frame_equal(first, again)
    # a changed parameter changes every key and recomputes
    assert _run(dj, out, _override(tmp_path, window=(-100, 200), name="ov2.yaml"), "--strict") == 0
    changed = pd.read_parquet(out / "manifest.parquet").set_index("case_id")
    assert not (changed["key"] == first["key"]).any()
    assert all(p.stat().st_mtime_ns != t for p, t in mtimes.items())
    # changed content of one input changes that case's key only
    img, lab = _body(seed=42)
    _save(tmp_path / "ds" / "imagesTr" / "c1.nii.gz", img)
    assert _run(dj, out, ov, "--strict") == 0
    k = pd.read_parquet(out / "manifest.parquet").set_index("case_id")["key"]
    assert k["c0"] == first["key"]["c0"] and k["c2"] == first["key"]["c2"] and k["c1"] != first["key"]["c1"]


def test_shards_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dj = _small_dataset(tmp_path / "ds", n=5)
    ov = _override(tmp_path)
    out = tmp_path / "prep"
    for k in range(2):
        assert _run(dj, out, ov, "--shard", str(k), "--num-shards", "2", "--strict") == 0
    s0 = pd.read_parquet(out / "shard-0" / "manifest.parquet")
    s1 = pd.read_parquet(out / "shard-1" / "manifest.parquet")
    assert list(s0["case_id"]) == ["c0", "c2", "c4"] and list(s1["case_id"]) == ["c1", "c3"]
    shards = [str(out / f"shard-{k}" / "manifest.parquet") for k in range(2)]
    assert main(["merge-manifest", "--inputs", *shards, "--out", str(out / "manifest.parquet")]) == 0
    store = Store(out)
    assert store.ids() == [f"c{i}" for i in range(5)]
    assert store.manifest["image"].iloc[1] == "shard-1/cases/c1/image.npy"
    for cid in store.ids():
        case = store.load(cid)
        assert case.image.shape == tuple(store.row(cid)["shape"]) and case.label is not None
    # the unsharded run gives the same rows (keys, shapes)
    assert _run(dj, tmp_path / "whole", ov) == 0
    whole = pd.read_parquet(tmp_path / "whole" / "manifest.parquet")
    assert list(whole["key"]) == list(store.manifest["key"])
    # duplicate case ids fail clearly
    capsys.readouterr()
    assert main(["merge-manifest", "--inputs", shards[0], shards[0], "--out", str(tmp_path / "dup.parquet")]) == 2
    assert "duplicate case id" in capsys.readouterr().err
    assert not (tmp_path / "dup.parquet").exists()


def test_card_override_and_multichannel(tmp_path: Path) -> None:
    """Region from the dataset.json when no card exists; a 2-channel MR image is accepted when the modality map
    lists two channels, and a channel count mismatch is rejected."""
    root = tmp_path / "ds"
    img, lab = _body()
    two = np.stack([img.astype(np.float32) + 1100, (img.astype(np.float32) + 1100) * 2], -1)
    two[img < 0] = 0
    e = {"image": _save(root / "imagesTr" / "mc.nii.gz", two), "label": _save(root / "labelsTr" / "mc.nii.gz", lab)}
    three = {"image": _save(root / "imagesTr" / "three.nii.gz", np.stack([two[..., 0]] * 3, -1))}
    dj = _write_dataset(root, [e, three], modality={"0": "T1", "1": "T2"}, region="brain")
    ov = tmp_path / "ov.yaml"
    ov.write_text(
        yaml.safe_dump(
            {"preprocess": {"roi": [8, 8, 8], "regions": {"brain": {"spacing": [4, 4, 4], "window": [0, 1]}}}}
        )
    )
    assert _run(dj, tmp_path / "prep", ov) == 0
    mf = pd.read_parquet(tmp_path / "prep" / "manifest.parquet").set_index("case_id")
    assert mf.loc["mc", "status"] == "ok" and mf.loc["mc", "region"] == "brain" and mf.loc["mc", "n_channels"] == 2
    assert "4-D" in mf.loc["three", "reason"] and "2 channel" in mf.loc["three", "reason"]
    case = Store(tmp_path / "prep").load("mc")
    assert case.image.shape[0] == 2 and case.image.shape[1:] == case.label.shape
