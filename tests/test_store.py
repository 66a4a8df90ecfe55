"""The fast-load store: Store API, to_original round trips, crop loading (pos:neg, determinism, workers)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from voco.data.catalog import read_dataset_json
from voco.data.loading import CropDataset, crop_start, extract, region_weights
from voco.data.preprocess import Params, preprocess_arrays, process_entry
from voco.data.store import MANIFEST, Store, to_original, write_manifest
from voco.errors import DataError

# LPS voxel axes, anisotropic spacing, a small obliquity-free rotation of axes (x <-> y swapped)
AFFINE = np.array([[0.0, -1.3, 0.0, 40.0], [-0.9, 0.0, 0.0, 25.0], [0.0, 0.0, 3.5, -60.0], [0, 0, 0, 1]])


def _phantom(shape=(48, 40, 18), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    c = [(n - 1) / 2 for n in shape]
    r = sum(((g[i] - c[i]) / (0.45 * shape[i])) ** 2 for i in range(3))
    img = np.where(r < 1, 50.0, -1000.0) + rng.normal(0, 15, shape)
    lab = np.zeros(shape, np.uint8)
    lab[(r < 0.25) & (g[0] < c[0])] = 1
    lab[(r < 0.12) & (g[1] > c[1])] = 2
    return img.astype(np.float32), lab


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("store")
    entries = []
    for i in range(4):
        img, lab = _phantom(seed=i)
        nib.save(nib.Nifti1Image(img.astype(np.int16), AFFINE), root / f"im{i}.nii.gz")
        e = {"image": f"im{i}.nii.gz", "class": i % 2}
        if i < 3:
            nib.save(nib.Nifti1Image(lab, AFFINE), root / f"lb{i}.nii.gz")
            e["label"] = f"lb{i}.nii.gz"
        entries.append(e)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a", "2": "b"}, "training": entries}))
    info = read_dataset_json(root / "dataset.json")
    params = Params(spacing=(2.0, 2.0, 2.0), window=(-175, 250), roi=(24, 24, 24))
    out = root / "prep"
    rows = [
        process_entry(e, out, params, "unit", ["abdomen", "chest"][e.index % 2], info.labels, {}) for e in info.entries
    ]
    write_manifest(rows, out / MANIFEST)
    return Store(out)


def test_store_api(store: Store) -> None:
    assert len(store) == 4
    assert store.ids(labelled=True) == ["im0", "im1", "im2"] and store.ids(labelled=False) == ["im3"]
    assert store.ids(split="test") == []
    c = store.load("im0")
    assert isinstance(c.image, np.memmap) and c.image.dtype == np.float16 and not c.image.flags.writeable
    assert 0.0 <= float(c.image.min()) and float(c.image.max()) <= 1.0
    assert c.label.dtype == np.uint8 and c.label.shape == c.image.shape and c.label_full is None
    for key in (
        "spacing",
        "affine",
        "original_shape",
        "original_affine",
        "crop_start",
        "pad_before",
        "region",
        "dataset",
        "labels",
        "key",
    ):
        assert key in c.meta
    assert nib.aff2axcodes(np.asarray(c.meta["affine"])) == ("R", "A", "S")
    assert c.fg is not None and len(c.fg) and all(c.label[tuple(p)] > 0 for p in c.fg[:50])
    assert store.load("im3").label is None
    with pytest.raises(DataError, match="no ok case"):
        store.load("nope")


def test_world_positions_preserved(store: Store) -> None:
    """A labelled voxel's world position (through the stored affine) lies inside the same structure originally."""
    c = store.load("im0")
    img, lab = _phantom(seed=0)
    inv = np.linalg.inv(AFFINE)
    pts = c.fg[:200]
    world = (np.asarray(c.meta["affine"]) @ np.c_[pts, np.ones(len(pts))].T).T
    vox = np.rint((inv @ world.T).T[:, :3]).astype(int)
    vox = np.clip(vox, 0, np.array(lab.shape) - 1)
    agree = np.mean(lab[tuple(vox.T)] == np.asarray(c.label)[tuple(pts.T)])
    assert agree > 0.95


def test_to_original_round_trip(store: Store) -> None:
    _, lab = _phantom(seed=1)
    c = store.load("im1")
    back = to_original(c.label, c.meta, order=0)
    assert back.shape == lab.shape and back.dtype == np.uint8
    dice = 2 * np.sum((back > 0) & (lab > 0)) / (np.sum(back > 0) + np.sum(lab > 0))
    assert dice > 0.9 and np.mean(back == lab) > 0.97
    # class probabilities (leading axis) with linear interpolation
    onehot = np.stack([np.asarray(c.label) == k for k in range(3)]).astype(np.float32)
    probs = to_original(onehot, c.meta, order=1)
    assert probs.shape == (3, *lab.shape)
    assert np.mean(probs[1:].argmax(0)[lab > 0] + 1 == lab[lab > 0]) > 0.9
    with pytest.raises(DataError, match="does not match"):
        to_original(np.zeros((3, 3, 3)), c.meta)


def test_to_original_exact_without_resampling() -> None:
    img, lab = _phantom(shape=(30, 26, 12))
    aff = np.diag([-2.0, 2.0, 2.0, 1.0])
    params = Params(spacing=(2.0, 2.0, 2.0), window=(-175, 250), roi=(32, 32, 32))
    prep = preprocess_arrays(img[None], aff, {"label": lab}, params)
    assert prep.meta["shape"] == [32, 32, 32]  # padded (the body is smaller than the ROI)
    np.testing.assert_array_equal(to_original(prep.labels["label"], prep.meta), lab)


def test_crop_dataset(store: Store) -> None:
    ds = CropDataset(store, (16, 16, 16), labelled=True, label="label", samples_per_case=4, seed=3)
    assert len(ds) == 12
    a, b = ds[5], ds[5]
    assert a["image"].shape == (1, 16, 16, 16) and a["image"].dtype == torch.float32
    assert a["label"].shape == (1, 16, 16, 16) and a["label"].dtype == torch.int64
    assert torch.equal(a["image"], b["image"]) and a["case_id"] == "im2" and a["class"] == 0  # item i -> case i % 3
    starts = [ds[i]["start"] for i in range(len(ds))]
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["start"], starts[i]) for i in range(len(ds)))  # new epoch, new crops
    ds.set_epoch(0)
    # the crop is the stored array at the reported corner
    case = store.load(a["case_id"])
    s = a["start"].numpy()
    np.testing.assert_array_equal(
        a["image"][0].numpy(), np.asarray(case.image[s[0] : s[0] + 16, s[1] : s[1] + 16, s[2] : s[2] + 16], np.float32)
    )
    # all-positive sampling: every crop centre sits on the label
    pos = CropDataset(store, (8, 8, 8), labelled=True, label="label", pos_neg=(1, 0), samples_per_case=10)
    assert all(pos[i]["label"][0, 4, 4, 4] > 0 for i in range(len(pos)))
    # ROI bigger than the stored volume: zero-padded crops
    big = CropDataset(store, (64, 8, 8))[0]
    assert big["image"].shape == (1, 64, 8, 8)
    # DataLoader with a worker process (Store pickles without its memory maps)
    dl = DataLoader(CropDataset(store, (16, 16, 16)), batch_size=2, num_workers=1)
    batch = next(iter(dl))
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["region"] == ["abdomen", "chest"]
    with pytest.raises(ValueError, match="no label"):
        CropDataset(store, (8, 8, 8), ids=["im3"], label="label")[0]


def test_region_weights_and_helpers() -> None:
    w = region_weights(["abdomen"] * 6 + ["chest"] * 2, {"abdomen": 8, "chest": 1})
    assert sum(w[:6]) == pytest.approx(8) and sum(w[6:]) == pytest.approx(1)
    draws = list(WeightedRandomSampler(w, 900, generator=torch.Generator().manual_seed(0)))
    frac_chest = np.mean([i >= 6 for i in draws])
    assert 0.05 < frac_chest < 0.18  # expected 1/9
    rng = np.random.default_rng(0)
    assert list(crop_start((10, 10, 10), (4, 4, 4), rng, center=(0, 9, 5))) == [0, 6, 3]
    assert extract(np.ones((2, 3, 4)), (0, 0, 0), (4, 4, 4)).sum() == 24
