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


# --------------------------------------------------------------------------------------- identifiers and verdicts
HOSTILE_IDS = {
    "up_two": "../..",
    "up_one": "..",
    "traversal": "sub/../../../sentinel",
    "backslashes": "..\\..\\sentinel",
    "nul": "a\x00b",
    "long": "x" * 300,
    "dot": ".hidden",
    "separator": "a/b",
}


def _sentinel(parent: Path) -> Path:
    s = parent / "sentinel"
    s.mkdir(parents=True)
    (s / "keep.txt").write_text("must survive")
    return s


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_hostile_case_ids_never_touch_anything_outside_the_store(tmp_path: Path) -> None:
    """Issue 14: a dataset.json case_id is data, never a path. The store lives inside the dataset folder (as in the
    reported incident, where ``"case_id": "../.."`` with a missing image made the rejection rmtree the input folder);
    every hostile id, with a missing image (rejection path) or a good one (write path), is rejected by name and
    nothing outside the store changes."""
    root = tmp_path / "ds"
    img, lab = _body()
    good = {"image": _save(root / "imagesTr" / "good.nii.gz", img), "label": _save(root / "labelsTr" / "good.nii.gz", lab)}
    sentinel = _sentinel(tmp_path)
    ids = dict(HOSTILE_IDS, absolute=str(sentinel.resolve()), absolute_case=str((tmp_path / "made_here").resolve()))
    training = [good]
    for cid in ids.values():
        training.append({"image": "imagesTr/missing.nii.gz", "case_id": cid})  # rejection path (rmtree)
        training.append({"image": good["image"], "label": good["label"], "case_id": cid + "_w"})  # write path
    dj = _write_dataset(root, training)
    out = root / "prep"  # inside the dataset folder: '../..' from out/cases is the dataset folder itself
    before_ds = {k: v for k, v in _tree(root).items() if not k.startswith("prep")}
    before_sentinel = _tree(sentinel)
    assert _run(dj, out, _override(tmp_path)) == 0
    mf = pd.read_parquet(out / "manifest.parquet")
    assert len(mf) == 1 + 2 * len(ids)
    rows = mf.set_index("index")
    assert rows.loc[0, "status"] == "ok" and rows.loc[0, "case_id"] == "good"
    for i, (name, cid) in enumerate(ids.items()):
        for j, suffix in enumerate(("", "_w")):
            r = rows.loc[1 + 2 * i + j]
            assert r["status"] == "rejected", (name, suffix)
            assert r["reason"].startswith("UnsafePathError: "), (name, r["reason"])
            assert "dataset.json" in r["reason"] and "case id" in r["reason"], r["reason"]
            assert r["case_id"] == cid + suffix  # the id is kept as data in the manifest
    # nothing outside the store changed: the dataset folder, the sentinel next to it, nothing created beside them
    assert {k: v for k, v in _tree(root).items() if not k.startswith("prep")} == before_ds
    assert _tree(sentinel) == before_sentinel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ov.yaml", "sentinel"]
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["good"]


def test_store_case_dir_refuses_ids_and_symlinks_that_leave_the_store(tmp_path: Path) -> None:
    from voco.data.store import case_dir
    from voco.errors import UnsafePathError

    out = tmp_path / "prep"
    (out / "cases").mkdir(parents=True)
    for cid in [*HOSTILE_IDS.values(), str(tmp_path), ""]:
        with pytest.raises(UnsafePathError):
            case_dir(out, cid)
    outside = _sentinel(tmp_path)
    (out / "cases" / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside"):
        case_dir(out, "link")
    assert case_dir(out, "case_01.a-b") == out / "cases" / "case_01.a-b"


def _rgb(shape=(20, 20, 10)) -> np.ndarray:
    rgb = np.zeros(shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 200
    return rgb


def test_rgb_and_complex_nifti_reject_one_case_each_and_the_rest_succeed(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    img, lab = _body()
    good = {"image": _save(root / "imagesTr" / "good.nii.gz", img), "label": _save(root / "labelsTr" / "good.nii.gz", lab)}
    rgb = {"image": _save(root / "imagesTr" / "rgb.nii.gz", _rgb())}
    cplx = img.astype(np.complex64) + 1j * img.astype(np.complex64)
    complex_case = {"image": _save(root / "imagesTr" / "cplx.nii.gz", cplx)}
    rgb_label = {"image": _save(root / "imagesTr" / "rgblab.nii.gz", img),
                 "label": _save(root / "labelsTr" / "rgblab.nii.gz", _rgb(img.shape))}
    assert nib.load(root / "imagesTr" / "rgb.nii.gz").get_data_dtype().names == ("R", "G", "B")
    assert nib.load(root / "imagesTr" / "cplx.nii.gz").get_data_dtype().kind == "c"
    dj = _write_dataset(root, [good, rgb, complex_case, rgb_label])
    out = tmp_path / "prep"
    assert _run(dj, out, _override(tmp_path)) == 0
    rows = pd.read_parquet(out / "manifest.parquet").set_index("case_id")
    assert rows.loc["good", "status"] == "ok"
    expect = {"rgb": "structured voxels (R,G,B", "cplx": "complex-valued voxels", "rgblab": "structured voxels"}
    for cid, needle in expect.items():
        assert rows.loc[cid, "status"] == "rejected"
        assert rows.loc[cid, "reason"].startswith("DataError: ") and needle in rows.loc[cid, "reason"]
        assert f"{cid}.nii.gz" in rows.loc[cid, "reason"]
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["good"]


def test_an_unexpected_exception_rejects_one_case_with_type_and_file(tmp_path: Path, monkeypatch) -> None:
    """Without the voxel-type check, an RGB file fails deep in numpy with a TypeError (the reported crash): that real
    exception now rejects its case (type, message, file) and the job goes on with exit status 0."""
    import voco.data.preprocess as P

    monkeypatch.setattr(P, "check_voxel_type", lambda *a, **k: None)
    root = tmp_path / "ds"
    img, lab = _body()
    good = {"image": _save(root / "imagesTr" / "good.nii.gz", img), "label": _save(root / "labelsTr" / "good.nii.gz", lab)}
    rgb = {"image": _save(root / "imagesTr" / "rgb.nii.gz", _rgb())}
    dj = _write_dataset(root, [rgb, good])
    out = tmp_path / "prep"
    assert _run(dj, out, _override(tmp_path)) == 0
    rows = pd.read_parquet(out / "manifest.parquet").set_index("case_id")
    assert rows.loc["good", "status"] == "ok"
    reason = rows.loc["rgb", "reason"]
    assert rows.loc["rgb", "status"] == "rejected"
    assert reason.split(":")[0] in ("TypeError", "ValueError") and "rgb.nii.gz" in reason, reason
    assert not (out / "cases" / "rgb").exists()


def test_cache_never_restores_split_class_or_index(tmp_path: Path) -> None:
    """Issue 13 item 7: moving a case from training to test (and changing a class, and the order) in dataset.json is
    what the next manifest says, while the stored arrays (same content, same parameters) are reused."""
    root = tmp_path / "ds"
    entries = []
    for i in range(3):
        img, lab = _body(seed=i)
        entries.append({"image": _save(root / "imagesTr" / f"c{i}.nii.gz", img),
                        "label": _save(root / "labelsTr" / f"c{i}.nii.gz", lab), "class": 0})
    dj = _write_dataset(root, entries)
    out, ov = tmp_path / "prep", _override(tmp_path)
    assert _run(dj, out, ov, "--strict") == 0
    first = pd.read_parquet(out / "manifest.parquet").set_index("case_id")
    assert list(first["split"]) == ["train"] * 3 and list(first["index"]) == [0, 1, 2]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("image.npy")}
    moved = dict(entries[1], **{"class": 1})
    dj = _write_dataset(root, [entries[2], entries[0]], test=[moved])
    assert _run(dj, out, ov, "--strict") == 0
    again = pd.read_parquet(out / "manifest.parquet").set_index("case_id")
    assert again.loc["c1", "split"] == "test" and again.loc["c1", "class"] == 1 and again.loc["c1", "index"] == 2
    assert again.loc["c2", "index"] == 0 and again.loc["c0", "index"] == 1
    assert list(again.loc[["c0", "c2"], "split"]) == ["train", "train"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("image.npy")} == mtimes  # arrays reused, not recomputed
    assert (again["key"] == first["key"].reindex(again.index)).all()
    from voco.train.finetune import split_cases

    store = Store(out)
    assert store.ids(split="test") == ["c1"]
    splits = split_cases(store, {"id": "unit", "task": "segmentation"})
    assert splits.test == ["c1"] and "c1" not in splits.train  # never trained on


def test_cases_the_conversion_failed_are_rejected_rows_of_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    img, lab = _body()
    good = {"image": _save(root / "imagesTr" / "good.nii.gz", img), "label": _save(root / "labelsTr" / "good.nii.gz", lab)}
    dj = _write_dataset(root, [good], voco_rejected=[{"case": "broken", "reason": "convert: DicomError: no slices"}])
    out = tmp_path / "prep"
    for k in range(2):
        assert _run(dj, out, _override(tmp_path), "--shard", str(k), "--num-shards", "2") == 0
    s0 = pd.read_parquet(out / "shard-0" / "manifest.parquet").set_index("case_id")
    s1 = pd.read_parquet(out / "shard-1" / "manifest.parquet")
    assert s0.loc["broken", "status"] == "rejected" and s0.loc["broken", "reason"] == "convert: DicomError: no slices"
    assert "broken" not in set(s1["case_id"])  # once, not once per shard
