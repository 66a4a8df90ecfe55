"""voco.ssl.crops: overlap position labels, crop sampling, augmentation, region-balanced sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voco.errors import DataError
from voco.ssl.crops import (
    CropAugment,
    collate_views,
    position_labels,
    region_balanced_indices,
    sample_centers,
    sample_voco_views,
)

NO_AUG = CropAugment.none()


def coord_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """Every voxel holds a unique value encoding its (x, y, z): x + 100 y + 10000 z (exact in float32)."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (x + 100 * y + 10000 * z).astype(np.float32)


# ---------------------------------------------------------------- position_labels
@pytest.mark.parametrize("grid,roi", [(3, 64), (3, 24), (4, 96), (2, 8)])
def test_centre_on_a_base_crop_is_one_hot(grid: int, roi: int) -> None:
    centers = [[roi * i + roi / 2, roi * j + roi / 2] for i in range(grid) for j in range(grid)]
    lab = position_labels(centers, roi, grid)
    assert lab.shape == (grid * grid, grid * grid)
    assert lab.dtype == torch.float32
    torch.testing.assert_close(lab, torch.eye(grid * grid))  # row s is base crop s: k = g*i + j


def test_centre_on_a_corner_gives_four_quarters() -> None:
    # corner shared by base crops (0,0), (0,1), (1,0), (1,1) -> k = 0, 1, 3, 4
    lab = position_labels([[64, 64]], 64, 3)[0]
    expect = torch.zeros(9)
    expect[[0, 1, 3, 4]] = 0.25
    torch.testing.assert_close(lab, expect)
    # the corner shared by (1,1), (1,2), (2,1), (2,2) -> k = 4, 5, 7, 8
    lab = position_labels([[128, 128]], 64, 3)[0]
    expect = torch.zeros(9)
    expect[[4, 5, 7, 8]] = 0.25
    torch.testing.assert_close(lab, expect)


def test_hand_computed_overlap_and_axis_order() -> None:
    # random crop x in [16, 80), y in [48, 112): x-overlap 48 with i=0, 16 with i=1; y-overlap 16 with j=0, 48 with j=1
    lab = position_labels(torch.tensor([[48.0, 80.0]]), 64, 3)[0]
    expect = torch.zeros(9)
    expect[0] = 48 * 16 / 64**2  # (i=0, j=0)
    expect[1] = 48 * 48 / 64**2  # (i=0, j=1)
    expect[3] = 16 * 16 / 64**2  # (i=1, j=0)
    expect[4] = 16 * 48 / 64**2  # (i=1, j=1)
    torch.testing.assert_close(lab, expect)
    # i runs along x: a crop shifted by one base crop in x lands on k = 3, in y on k = 1
    assert position_labels([[96, 32]], 64, 3)[0].argmax().item() == 3
    assert position_labels([[32, 96]], 64, 3)[0].argmax().item() == 1


def test_rows_sum_to_one_inside_the_block_for_every_integer_centre() -> None:
    grid, roi = 3, 8
    c = np.arange(roi // 2, grid * roi - roi // 2)
    centers = np.stack(np.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    lab = position_labels(centers, roi, grid, dtype=torch.float64)
    assert lab.shape == (len(centers), 9)
    assert float(lab.min()) >= 0.0 and float(lab.max()) <= 1.0
    torch.testing.assert_close(lab.sum(1), torch.ones(len(centers), dtype=torch.float64))
    # a crop reaching outside the block loses exactly the outside share
    out = position_labels([[0.0, roi / 2]], roi, grid, dtype=torch.float64)[0]
    assert out.sum().item() == pytest.approx(0.5)


def test_half_integer_centres_and_odd_roi() -> None:
    lab = position_labels([[2.5, 2.5], [5.0, 2.5]], 5, 2, dtype=torch.float64)
    torch.testing.assert_close(lab[0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(lab[1], torch.tensor([0.5, 0, 0.5, 0], dtype=torch.float64))


def test_position_labels_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        position_labels(np.zeros((4, 3)), 8, 3)
    with pytest.raises(ValueError):
        position_labels([[1, 1]], 0, 3)


def test_sampled_centres_cover_the_spec_range() -> None:
    rng = np.random.default_rng(0)
    c = sample_centers(20000, 3, 8, rng)
    assert c.shape == (20000, 2)
    assert np.all(c == np.round(c))  # integer centres for even roi
    assert c.min() == 4 and c.max() == 3 * 8 - 4 - 1  # [r/2, g*r - r/2)
    assert len(np.unique(c[:, 0])) == 16


# ---------------------------------------------------------------- sample_voco_views
def test_views_are_the_block_tiles_and_labels_match_the_centres() -> None:
    grid, roi, sw = 3, 4, 5
    vol = coord_volume((20, 17, 9))
    out = sample_voco_views(vol, grid, roi, sw, np.random.default_rng(3), augment=NO_AUG)
    assert out["base"].shape == (9, 1, 4, 4, 4) and out["base"].dtype == torch.float32
    assert out["rand"].shape == (sw, 1, 4, 4, 4)
    assert out["labels"].shape == (sw, 9) and out["centers"].shape == (sw, 2)
    ox, oy, oz = out["origin"].tolist()
    assert 0 <= ox <= 20 - 12 and 0 <= oy <= 17 - 12 and 0 <= oz <= 9 - 4
    t = torch.from_numpy(vol)
    for i in range(grid):
        for j in range(grid):
            x0, y0 = ox + roi * i, oy + roi * j
            torch.testing.assert_close(out["base"][grid * i + j, 0], t[x0 : x0 + roi, y0 : y0 + roi, oz : oz + roi])
    for s, (cx, cy) in enumerate(out["centers"].tolist()):
        x0, y0 = ox + int(cx) - roi // 2, oy + int(cy) - roi // 2
        torch.testing.assert_close(out["rand"][s, 0], t[x0 : x0 + roi, y0 : y0 + roi, oz : oz + roi])
    torch.testing.assert_close(out["labels"], position_labels(out["centers"], roi, grid))
    torch.testing.assert_close(out["labels"].sum(1), torch.ones(sw))


def test_overlap_label_equals_shared_voxels() -> None:
    """The label is the share of the random crop's voxels that are also voxels of base crop k (unique-valued volume)."""
    grid, roi = 3, 6
    out = sample_voco_views(coord_volume((18, 18, 6)), grid, roi, 8, np.random.default_rng(1), augment=NO_AUG)
    for s in range(8):
        rv = set(out["rand"][s].flatten().tolist())
        shared = torch.tensor([len(rv & set(out["base"][k].flatten().tolist())) / roi**3 for k in range(9)])
        torch.testing.assert_close(out["labels"][s], shared)


def test_small_volume_is_padded_symmetrically() -> None:
    vol = np.ones((10, 5, 3), dtype=np.float32)
    out = sample_voco_views(vol, 3, 4, 2, np.random.default_rng(0), augment=NO_AUG, pad_value=-1.0)
    assert out["origin"].tolist() == [-1, -3, 0]  # (12-10)//2, (12-5)//2; z: (4-3)//2 = 0
    block = torch.full((12, 12, 4), -1.0)
    block[1:11, 3:8, 0:3] = 1.0
    torch.testing.assert_close(out["base"][0, 0], block[0:4, 0:4, :])
    torch.testing.assert_close(out["base"][4, 0], block[4:8, 4:8, :])


def test_float16_memmap_and_channel_first_input(tmp_path) -> None:
    mm = np.lib.format.open_memmap(tmp_path / "img.npy", mode="w+", dtype=np.float16, shape=(30, 26, 12))
    mm[:] = np.random.default_rng(0).random((30, 26, 12))
    mm.flush()
    ro = np.load(tmp_path / "img.npy", mmap_mode="r")
    a = sample_voco_views(ro, 3, 8, 2, 5)
    b = sample_voco_views(torch.from_numpy(np.asarray(ro, dtype=np.float32))[None], 3, 8, 2, 5)
    for k in ("base", "rand", "labels", "centers", "origin"):
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(DataError, match="3-D"):
        sample_voco_views(np.zeros((4, 4)), 3, 8, 2, 0)
    with pytest.raises(ValueError, match="method"):
        sample_voco_views(ro, 3, 8, 2, 0, method="simclr")


def test_same_seed_same_views_other_seed_other_views() -> None:
    vol = np.random.default_rng(0).random((40, 40, 20)).astype(np.float32)
    a, b = sample_voco_views(vol, 3, 8, 4, 7), sample_voco_views(vol, 3, 8, 4, 7)
    c = sample_voco_views(vol, 3, 8, 4, 8)
    t1 = sample_voco_views(vol, 3, 8, 4, torch.Generator().manual_seed(3))
    t2 = sample_voco_views(vol, 3, 8, 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(t1["rand"], t2["rand"])
    small = sample_voco_views(vol, 3, 8, 4, 7, out_size=4)  # optional resize of every crop
    assert small["base"].shape == (9, 1, 4, 4, 4)
    torch.testing.assert_close(small["labels"], a["labels"])
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not torch.equal(a["rand"], c["rand"])


def test_augmentation_is_per_crop_and_keeps_the_voxels() -> None:
    vol = coord_volume((24, 24, 8))
    plain = sample_voco_views(vol, 3, 8, 4, np.random.default_rng(2), augment=NO_AUG)
    flip = sample_voco_views(vol, 3, 8, 4, np.random.default_rng(2), augment=CropAugment(1.0, 0.0, 0.0, 0.0))
    torch.testing.assert_close(flip["base"], plain["base"].flip(2, 3, 4))
    torch.testing.assert_close(flip["labels"], plain["labels"])  # labels are computed before augmentation
    small = vol / 1e5  # values in [0, 1) so that float32 resolves the shift
    plain = sample_voco_views(small, 3, 8, 4, np.random.default_rng(2), augment=NO_AUG)
    shift = sample_voco_views(small, 3, 8, 4, np.random.default_rng(2), augment=CropAugment(0.0, 0.0, 0.1, 1.0))
    d = (shift["base"] - plain["base"]).flatten(1)
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-6)  # one constant per crop ...
    assert d[:, 0].abs().max() <= 0.1 + 1e-4 and len(set(d[:, 0].tolist())) == 9  # ... drawn independently
    plain = sample_voco_views(vol, 3, 8, 4, np.random.default_rng(4), augment=NO_AUG)
    mixed = sample_voco_views(vol, 3, 8, 4, np.random.default_rng(4), augment=CropAugment(0.2, 0.2, 0.0, 0.0))
    changed = [not torch.equal(mixed["base"][k], plain["base"][k]) for k in range(9)]
    assert any(changed) and not all(changed)  # independent draws: some crops augmented, some not
    for k in range(9):  # flips / rot90 only move voxels
        assert sorted(mixed["base"][k].flatten().tolist()) == sorted(plain["base"][k].flatten().tolist())


def test_rot90_is_in_the_xy_plane() -> None:
    crop = torch.arange(2 * 3 * 3 * 4, dtype=torch.float32).reshape(2, 3, 3, 4)
    out = CropAugment(0.0, 1.0, 0.0, 0.0)(crop, np.random.default_rng(0))
    assert any(torch.equal(out, torch.rot90(crop, k, dims=(1, 2))) for k in (1, 2, 3))
    assert CropAugment.from_config({"flip_p": 0.5}) == CropAugment(0.5, 0.2, 0.1, 0.5)


def test_voco_v1_resizes_the_whole_volume_and_the_crops() -> None:
    grid, roi, out_size = 4, 8, 4
    x = np.linspace(0.0, 1.0, 50, dtype=np.float32)
    vol = np.broadcast_to(x[:, None, None], (50, 30, 20)).copy()  # a ramp along x
    out = sample_voco_views(vol, grid, roi, 3, 0, method="voco-v1", out_size=out_size, augment=NO_AUG)
    assert out["base"].shape == (16, 1, 4, 4, 4) and out["rand"].shape == (3, 1, 4, 4, 4)
    assert out["labels"].shape == (3, 16) and out["origin"].tolist() == [0, 0, 0]
    torch.testing.assert_close(out["labels"], position_labels(out["centers"], roi, grid))
    means = out["base"].mean((1, 2, 3, 4)).reshape(grid, grid)
    assert torch.all(means[1:, 0] > means[:-1, 0])  # rises with i (x) ...
    torch.testing.assert_close(means, means[:, :1].expand_as(means))  # ... not with j (y)
    assert float(out["base"].min()) >= 0.0 and float(out["base"].max()) <= 1.0 + 1e-6
    assert torch.all((out["centers"] >= roi / 2) & (out["centers"] < grid * roi - roi / 2))


def test_collate_views_order() -> None:
    vol = np.random.default_rng(0).random((30, 30, 10)).astype(np.float32)
    s = [sample_voco_views(vol, 3, 8, 2, seed) for seed in (0, 1)]
    c = collate_views(s)
    assert c["rand"].shape == (4, 1, 8, 8, 8) and c["base"].shape == (18, 1, 8, 8, 8)
    assert c["labels"].shape == (2, 2, 9) and c["centers"].shape == (2, 2, 2)
    torch.testing.assert_close(c["rand"][2:], s[1]["rand"])
    torch.testing.assert_close(c["base"][9:], s[1]["base"])


# ---------------------------------------------------------------- region balancing
def test_region_balanced_default_is_volume_proportional() -> None:
    """Default (the reference): every volume carries its region's weight, abdomen x8, head-neck x8, chest x1, so a
    region is drawn in proportion to weight x volume count: 300 abdomen, 30 chest, 5 head-neck volumes give
    P(abdomen) = 2400 / 2470, P(chest) = 30 / 2470, P(head_neck) = 40 / 2470."""
    regions = ["abdomen"] * 300 + ["chest"] * 30 + ["head_neck"] * 5
    idx = region_balanced_indices(regions, 40000, np.random.default_rng(0))
    tags = np.asarray(regions)[idx]
    share = {r: float(np.mean(tags == r)) for r in ("abdomen", "head_neck", "chest")}
    assert share["abdomen"] == pytest.approx(2400 / 2470, abs=0.005)
    assert share["chest"] == pytest.approx(30 / 2470, abs=0.003)
    assert share["head_neck"] == pytest.approx(40 / 2470, abs=0.003)
    # inside a region every volume is equally likely: each abdomen volume ~ 1/300 of the abdomen draws
    counts = np.bincount(idx[tags == "abdomen"], minlength=300)[:300]
    assert counts.min() > 0.5 * counts.mean()


def test_region_balanced_region_mode_ratio() -> None:
    regions = ["abdomen"] * 300 + ["chest"] * 30 + ["head_neck"] * 5
    idx = region_balanced_indices(regions, 17000, np.random.default_rng(0), mode="region")
    assert idx.dtype == np.int64 and idx.shape == (17000,)
    tags = np.asarray(regions)[idx]
    share = {r: float(np.mean(tags == r)) for r in ("abdomen", "head_neck", "chest")}
    assert share["abdomen"] == pytest.approx(8 / 17, abs=0.015)
    assert share["head_neck"] == pytest.approx(8 / 17, abs=0.015)
    assert share["chest"] == pytest.approx(1 / 17, abs=0.01)
    assert len(np.unique(idx[tags == "head_neck"])) == 5  # uniform inside a region


def test_region_balanced_volume_mode_weights_and_errors() -> None:
    regions = ["abdomen"] * 10 + ["chest"] * 100 + ["brain"] * 10
    idx = region_balanced_indices(regions, 20000, 1, mode="volume", weights={"abdomen": 8, "chest": 1, "brain": 0})
    tags = np.asarray(regions)[idx]
    assert float(np.mean(tags == "abdomen")) == pytest.approx(80 / 180, abs=0.015)
    assert not np.any(tags == "brain")
    idx = region_balanced_indices(regions, 3000, 1, weights={"chest": 1.0}, default_weight=2.0, mode="region")
    assert float(np.mean(np.asarray(regions)[idx] == "chest")) == pytest.approx(1 / 5, abs=0.03)
    idx = region_balanced_indices(regions, 3000, 1, weights={"chest": 1.0}, default_weight=2.0)  # 100 / (20+100+20)
    assert float(np.mean(np.asarray(regions)[idx] == "chest")) == pytest.approx(100 / 140, abs=0.03)
    with pytest.raises(DataError, match="weight 0"):
        region_balanced_indices(["chest"], 3, 0, weights={"chest": 0})
    with pytest.raises(DataError, match="empty"):
        region_balanced_indices([], 3, 0)
    with pytest.raises(ValueError, match="mode"):
        region_balanced_indices(["chest"], 3, 0, mode="case")
