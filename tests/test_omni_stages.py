"""Omni stages: labelled-crop sampler (pos:neg), DiceCE (plain and marginal), SuPreM loss, stage 1 / 2 runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from voco.omni.losses import dice_ce, sigmoid_dice_bce
from voco.omni.sampling import PosNegSampler, crop_start, extract


def _volume(shape=(40, 36, 30), box=(slice(5, 9), slice(6, 10), slice(20, 24))):
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    lab[box] = 3
    return img, lab


def test_crop_start_inside_volume():
    assert crop_start((0, 0, 0), (40, 40, 40), (16, 16, 16)) == (0, 0, 0)
    assert crop_start((39, 20, 8), (40, 40, 40), (16, 16, 16)) == (24, 12, 0)
    # volume smaller than the ROI: start 0, extract pads
    a = np.ones((4, 5, 6))
    assert crop_start((2, 2, 2), a.shape, (8, 8, 8)) == (0, 0, 0)
    assert extract(a, (0, 0, 0), (8, 8, 8)).shape == (8, 8, 8)


def test_posneg_ratio_and_crops():
    img, lab = _volume()
    s = PosNegSampler(["a"], lambda k: (img, lab), roi=(8, 8, 8), pos=9, neg=1, seed=1)
    hits = 0
    n = 600
    for _ in range(n // 4):
        x, y, keys = s.sample(4)
        assert x.shape == (4, 1, 8, 8, 8) and y.shape == (4, 8, 8, 8) and keys == ["a"] * 4
        hits += int(sum((yy > 0).any() for yy in y))
    # foreground-centred crops always contain foreground; background-centred ones rarely do (small object)
    frac = hits / n
    assert 0.85 <= frac <= 0.97, frac
    # crops are views of the data: the image crop and the label crop come from one place of the volume
    s2 = PosNegSampler(["a"], lambda k: (img, lab), roi=(8, 8, 8), pos=1, neg=0, seed=3)
    x, y, _ = s2.sample(1)
    assert (y > 0).any()
    windows = np.lib.stride_tricks.sliding_window_view(img, (8, 8, 8))
    where = np.argwhere((windows == x[0, 0]).all(axis=(3, 4, 5)))
    assert len(where) == 1, "the image crop is not a window of the volume"
    i, j, k = where[0]
    assert np.array_equal(y[0], lab[i:i + 8, j:j + 8, k:k + 8])


def test_posneg_sampler_state_roundtrip():
    img, lab = _volume()
    s = PosNegSampler(["a", "b"], lambda k: (img, lab), roi=(8, 8, 8), seed=5)
    s.sample(3)
    st = s.state_dict()
    a = s.sample(4)
    s.load_state_dict(st)
    b = s.sample(4)
    assert np.array_equal(a[0], b[0]) and a[2] == b[2]


def test_posneg_sampler_only_background():
    img, _ = _volume()
    lab = np.zeros_like(img, dtype=np.uint8)
    s = PosNegSampler(["a"], lambda k: (img, lab), roi=(8, 8, 8), pos=9, neg=1)
    x, y, _ = s.sample(3)
    assert x.shape == (3, 1, 8, 8, 8) and not y.any()


def test_dice_ce_matches_monai():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, 7, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (3, 1, 6, 7, 8), generator=g)
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)(logits, target)
    ours = dice_ce(logits, target)
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)
    full = torch.ones(3, 5, dtype=torch.bool)
    assert torch.allclose(dice_ce(logits, target, full), ref, atol=1e-5)


def test_dice_ce_marginal_merges_unannotated_into_background():
    # Two classes + background; the source annotates only class 1. A voxel the network calls class 2 where the
    # source says background must cost nothing in CE: p(bg) + p(class 2) is the marginal background.
    logits = torch.tensor([[-10.0], [-10.0], [10.0]]).view(1, 3, 1, 1, 1).requires_grad_(True)
    target = torch.zeros(1, 1, 1, 1, 1, dtype=torch.long)
    mask = torch.tensor([[True, True, False]])
    marginal = dice_ce(logits, target, mask, lambda_dice=0.0)
    plain = dice_ce(logits, target, lambda_dice=0.0)
    assert marginal.item() < 1e-3 < plain.item()
    marginal.backward()
    assert logits.grad is not None and float(logits.grad.abs().max()) < 1e-3
    # Dice runs over the annotated foreground class only (class 2 is not a Dice term)
    g = torch.Generator().manual_seed(1)
    lg = torch.randn(2, 3, 4, 4, 4, generator=g)
    tg = torch.randint(0, 2, (2, 4, 4, 4), generator=g)
    m = torch.tensor([[True, True, False]] * 2)
    p1 = torch.softmax(lg, 1)[:, 1]
    g1 = (tg == 1).float()
    inter, den = (p1 * g1).sum((1, 2, 3)), p1.sum((1, 2, 3)) + g1.sum((1, 2, 3))
    expect = (1 - (2 * inter + 1e-5) / (den + 1e-5)).mean()
    assert torch.allclose(dice_ce(lg, tg, m, lambda_ce=0.0), expect, atol=1e-6)


def test_sigmoid_dice_bce_masks_unannotated_classes():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, 5, 5, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 5, 5), generator=g)
    mask = torch.tensor([[True, True, False, True], [True, False, True, False]])  # label space (bg + 3)
    loss = sigmoid_dice_bce(logits, target, mask)
    loss.backward()
    # sample 0 does not annotate class 2 (channel 1); sample 1 annotates only class 2 (channel 1)
    assert float(logits.grad[0, 1].abs().sum()) == 0.0
    assert float(logits.grad[1, 0].abs().sum()) == 0.0 and float(logits.grad[1, 2].abs().sum()) == 0.0
    assert float(logits.grad[1, 1].abs().sum()) > 0.0
    # perfect prediction -> near-zero loss
    onehot = torch.nn.functional.one_hot(target, 4).movedim(-1, 1)[:, 1:].float()
    perfect = (onehot * 2 - 1) * 30.0
    assert float(sigmoid_dice_bce(perfect, target)) < 1e-3


def test_posneg_sampler_uses_store_foreground_sample():
    img, lab = _volume()
    fg = np.argwhere(lab > 0).astype(np.int32)[::7]  # the store keeps a sample of foreground positions
    s = PosNegSampler(["a"], lambda k: (img, lab, fg), roi=(8, 8, 8), pos=1, neg=0, seed=0)
    _, y, _ = s.sample(8)
    assert all((yy > 0).any() for yy in y)
    s = PosNegSampler(["a"], lambda k: (img, lab, fg), roi=(4, 4, 4), pos=0, neg=1, seed=0)
    _, y, _ = s.sample(8)
    assert sum((yy > 0).any() for yy in y) <= 2


# ----------------------------------------------------------------------------------------- stage 1 -> pseudo -> 2
VOCOMNI_LABELS = {0: "background", 1: "spleen", 2: "kidney_right", 6: "liver"}  # values are VoComni channels


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory):
    import yaml
    from test_vocomni import make_store, write_card

    root = tmp_path_factory.mktemp("stages")
    cards = root / "cards"
    cards.mkdir()
    write_card(cards, "tiny_pool", {0: "background"}, ["pretrain", "unlabelled"])
    make_store(root / "prep" / "tiny_pool", "tiny_pool", {0: "background"}, 4, seed=3, labelled=False)
    # a curated VoComni store: complete labels in VoComni channels
    make_store(root / "vocomni", "vocomni", VOCOMNI_LABELS, 4, seed=4)
    override = {
        "cards_dir": str(cards),
        "paths": {"data": str(root / "data"), "runs": str(root / "runs"), "results": str(root / "results"),
                  "logs": str(root / "logs")},
        "datasets": {"pretrain": ["tiny_pool"], "downstream": []},
        "preprocess": {"roi": [16, 16, 16], "shards": 2},
        "model": {"name": "cnn_small", "feature_size": 4},
        "pretrain": {
            "batch_size": 2, "num_workers": 0, "warmup": 0, "lr": 3e-3, "checkpoint_every": 3, "log_every": 1,
            "voco": {"roi": 16, "hidden_dim": 32, "out_dim": 32},
            "omni": {"stage1_steps": 6, "stage2_steps": 4, "labelled": str(root / "vocomni"),
                     "pseudo_min_confidence": 0.0, "lr": 3e-3, "warmup": 2,
                     # the paper's SPEC 6 values (the laptop base turns flips / rot90 off)
                     "augment": {"flip_p": 0.2, "rot90_p": 0.2, "intensity": 0.1, "intensity_p": 0.1}},
        },
    }
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    return root


def _metrics(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_stage1_pseudolabel_stage2(stage_env):
    import json

    from voco.cli import main
    from voco.data.store import Store
    from voco.train.checkpoint import load_checkpoint

    root = stage_env
    ov = ["--override", str(root / "override.yaml")]
    run = root / "runs" / "pretrain" / "default"
    pool = str(root / "prep" / "tiny_pool")
    assert main(["pretrain", "--stage", "1", "--prep", pool, "--out", str(run / "stage1"), *ov]) == 0
    s1 = load_checkpoint(run / "stage1" / "final.pt")
    assert s1["stage"] == "stage1" and s1["step"] == 6
    m1 = _metrics(run / "stage1" / "metrics.jsonl")
    # one schedule over both stages (lr 3e-3, warmup 2, 6 + 4 = 10 steps): step s (scheduler step k = s - 1) runs at
    # 3e-3 * (k + 1) / 2 for k < 2, then 3e-3 * 0.5 * (1 + cos(pi * (k - 2) / 8)); stage 1 ends at step 6 with
    # 3e-3 * 0.5 * (1 + cos(3 pi / 8)) = 2.074e-3 (a per-stage schedule would have decayed to 3e-3 * 0.146 = 4.4e-4)
    lr_expect = {s: 3e-3 * (s / 2 if s <= 2 else 0.5 * (1 + math.cos(math.pi * (s - 3) / 8))) for s in range(1, 11)}
    assert [r["lr"] for r in m1] == pytest.approx([lr_expect[s] for s in range(1, 7)], rel=1e-6)
    assert m1[-1]["lr"] == pytest.approx(2.0740e-3, rel=1e-4)
    assert [r["step"] for r in m1] == list(range(1, 7))
    assert {"sup", "ssl", "pred", "inter", "reg", "acc"} <= set(m1[-1])
    assert (run / "stage1" / "backbone.pt").is_file()

    # pseudo-labels, two shards, then merge
    out = run / "pseudo" / "tiny_pool"
    for k in (0, 1):
        assert main(["pseudolabel", "--ckpt", str(run / "stage1" / "final.pt"), "--prep", pool, "--out", str(out),
                     "--shard", str(k), "--num-shards", "2", *ov]) == 0
    assert main(["pseudolabel", "--merge", "--out", str(out), "--num-shards", "2", *ov]) == 0
    summary = json.loads((root / "results" / "omni" / "pseudo_tiny_pool.json").read_text())
    assert summary["cases"] == 4 and summary["kept"] == 4
    # every class of the pool's full truth is scored (a class the model also predicts elsewhere may be added)
    assert {"spleen", "kidney_right", "liver"} <= set(summary["dice_per_class"])
    store = Store(out)
    assert len(store.ids()) == 4
    # the reported Dice is the Dice of the stored pseudo-labels against the full truth, recomputed here per case
    from voco.omni.curation import VOCOMNI_CLASSES, per_class_dice

    src = Store(pool)
    manifest = store.manifest.set_index("case_id")
    per_case: dict[str, list[float]] = {}
    for cid in store.ids():
        case = store.load(cid)
        truth = src.load(cid).label_full  # the tiny phantom's label values are the VoComni channels already
        assert case.label.shape == case.image.shape == truth.shape
        d = per_class_dice(case.label, truth, len(VOCOMNI_CLASSES))
        expect = {VOCOMNI_CLASSES[i]: float(d[i]) for i in range(1, len(VOCOMNI_CLASSES)) if np.isfinite(d[i])}
        got = json.loads(manifest.loc[cid, "dice_per_class"])
        assert got.keys() == expect.keys() and all(got[k] == pytest.approx(v) for k, v in expect.items()), cid
        for k, v in expect.items():
            per_case.setdefault(k, []).append(v)
        assert case.meta["pseudo"]["confidence"] == pytest.approx(float(manifest.loc[cid, "confidence"]))
    assert summary["dice_per_class"] == pytest.approx({k: float(np.mean(v)) for k, v in per_case.items()})
    assert summary["dice_mean"] == pytest.approx(float(np.mean(list(summary["dice_per_class"].values()))))

    # a stricter threshold at merge time: every volume left out of stage 2 and listed
    import pandas as pd

    strict = root / "strict.yaml"
    strict.write_text("pretrain:\n  omni:\n    pseudo_min_confidence: 1.0\n")
    strict_out = root / "strict_pseudo" / "tiny_pool"
    import shutil

    shutil.copytree(out, strict_out)
    assert main(["pseudolabel", "--merge", "--out", str(strict_out), "--num-shards", "2", *ov,
                 "--override", str(strict), "--report", str(root / "strict.json")]) == 0
    assert Store(strict_out).ids() == []
    assert len(pd.read_csv(strict_out / "low_confidence.csv")) == 4
    # ... and stage 2 still runs (L_SSL + labelled DiceCE), saying that no pseudo-labelled volume was used
    assert main(["pretrain", "--stage", "2", "--prep", pool, "--out", str(run / "stage2_nopseudo"), "--pseudo",
                 str(strict_out), "--init", str(run / "stage1" / "final.pt"), "--steps", "1", *ov]) == 0
    assert json.loads((run / "stage2_nopseudo" / "summary.json").read_text())["pseudo"]["volumes"] == 0
    assert load_checkpoint(run / "stage2_nopseudo" / "final.pt")["step"] == 7

    # stage 2 continues the global step from the switch; its checkpoint says stage2
    assert main(["pretrain", "--stage", "2", "--prep", pool, "--out", str(run / "stage2"), *ov]) == 0
    s2 = load_checkpoint(run / "stage2" / "final.pt")
    assert s2["stage"] == "stage2" and s2["step"] == 10
    m2 = _metrics(run / "stage2" / "metrics.jsonl")
    assert [r["step"] for r in m2] == [7, 8, 9, 10] and all("pseudo" in r and "sup" in r for r in m2)
    # no restart at the switch: stage 2 continues the same curve (step 7: 3e-3 * 0.5 * (1 + cos(pi / 2)) = 1.5e-3)
    assert [r["lr"] for r in m2] == pytest.approx([lr_expect[s] for s in range(7, 11)], rel=1e-6)
    assert m2[0]["lr"] < m1[-1]["lr"] and m2[0]["lr"] == pytest.approx(1.5e-3, rel=1e-6)
    assert s2["scheduler"]["last_epoch"] == 10  # scheduler carried over from stage 1
    st = json.loads((run / "stage2" / "summary.json").read_text())
    assert st["switch_step"] == 6 and st["stage_steps"] == 4 and st["pseudo"]["volumes"] == 4
    # SPEC 6 augmentation on labelled and pseudo-labelled crops (as configured), and the pseudo crops counted
    assert st["augment"] == {"flip_p": 0.2, "rot90_p": 0.2, "intensity": 0.1, "intensity_p": 0.1}
    assert st["pseudo"]["crops"] == 4 * 4  # pseudo_crops (4) per step x 4 stage-2 steps
    # a finished stage is not re-run
    assert main(["pretrain", "--stage", "2", "--prep", pool, "--out", str(run / "stage2"), *ov]) == 0
    assert _metrics(run / "stage2" / "metrics.jsonl") == m2

    # the reference's online mode: frozen snapshot teacher on the SSL random crops, decoder-only
    online = root / "online.yaml"
    online.write_text("pretrain:\n  omni:\n    stage2_pseudo: online\n")
    assert main(["pretrain", "--stage", "2", "--prep", pool, "--out", str(run / "stage2_online"),
                 "--init", str(run / "stage1" / "final.pt"), "--steps", "2", *ov, "--override", str(online)]) == 0
    so = load_checkpoint(run / "stage2_online" / "final.pt")
    assert so["stage"] == "stage2" and so["step"] == 8 and "online_teacher" in so["extra"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["segresnet"])  # unet needs >= 32^3 crops: too slow for the test budget
def test_suprem_pretrains_on_partial_sources(tmp_path, backbone):
    import json

    import yaml
    from test_vocomni import SRC_A, SRC_B, make_store, write_card

    from voco.cli import main
    from voco.train.checkpoint import load_checkpoint

    cards = tmp_path / "cards"
    cards.mkdir()
    write_card(cards, "tiny_src_a", SRC_A, ["pretrain", "vocomni"])
    write_card(cards, "tiny_src_b", SRC_B, ["pretrain", "vocomni"])
    a = make_store(tmp_path / "a", "tiny_src_a", SRC_A, 2, seed=1)
    b = make_store(tmp_path / "b", "tiny_src_b", SRC_B, 2, seed=2)
    ov = tmp_path / "ov.yaml"
    ov.write_text(yaml.safe_dump({
        # BasicUNet downsamples 4 times: 16^3 would leave a 1^3 bottleneck that instance norm rejects
        "cards_dir": str(cards), "preprocess": {"roi": [32, 32, 32] if backbone == "unet" else [16, 16, 16]},
        "pretrain": {"log_every": 1, "suprem": {"model": backbone, "feature_size": 8,
                                                 "steps": 3, "warmup": 0, "crops_per_step": 2}},
    }))
    out = tmp_path / "suprem"
    assert main(["pretrain", "--method", "suprem", "--prep", str(a), str(b), "--out", str(out),
                 "--override", str(ov)]) == 0
    ck = load_checkpoint(out / "final.pt")
    assert ck["stage"] == "suprem" and ck["method"] == "suprem" and ck["step"] == 3
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == backbone and s["data"]["tiny_src_a"] == ["liver", "spleen"]
    # SuPreM's classes come from its training data's label maps (SPEC 5): liver, spleen (source a)
    # + kidney_right (source b), not the 20 VoComni classes
    assert s["classes"] == ["liver", "spleen", "kidney_right"]
    assert s["data"]["tiny_src_b"] == ["liver", "kidney_right"]
    blob = torch.load(out / "backbone.pt", weights_only=True)
    head = [k for k in blob["model"] if k.endswith("weight")][-1]
    assert blob["model"][head].shape[0] == 3  # one sigmoid per class
    assert [blob["meta"]["labels"][str(i)] for i in range(3)] == s["classes"]


def test_online_pseudo_loss_trains_the_decoder_only():
    from voco.models import build_model, decoder_parameter_names
    from voco.omni.stages import OmniNet
    from voco.ssl.heads import FeatureDropout, Projector
    from voco.train.pretrain_ssl import SSLNet

    torch.manual_seed(0)
    backbone = build_model("cnn_small", 1, 4, feature_size=4)
    net = OmniNet(SSLNet(backbone, Projector(backbone.embed_dim, 16, 16), FeatureDropout(0.0)))
    x = torch.rand(2, 1, 16, 16, 16)
    _, _, _, online = net(x, None, x)
    dice_ce(online, torch.randint(0, 4, (2, 1, 16, 16, 16))).backward()
    dec = set(decoder_parameter_names(backbone))
    assert dec
    for n, p in backbone.named_parameters():
        if n in dec:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
        else:
            assert p.grad is None or float(p.grad.abs().sum()) == 0, n
    # the same logits as the plain forward
    assert torch.allclose(online, backbone(x), atol=1e-5)


def test_labelled_batches_augment_every_crop():
    """With augment, batch i is batch i of the plain factory transformed: flip_p 1 flips every crop on all three axes
    (image and label alike); intensity 0.1 with p 1 scales by 1 + u and shifts by v, |u|, |v| <= 0.1."""
    from voco.omni.stage import LabelledBatches, LabelledPool, PoolSource

    img, lab = _volume()

    class _Store:  # the pool's interface over one in-memory case
        root = "mem"

        def ids(self, labelled=True):
            return ["a"]

        def load(self, _cid):
            from types import SimpleNamespace

            return SimpleNamespace(image=img, label=lab, fg=None)

    pool = LabelledPool([PoolSource(_Store(), None, np.ones(4, dtype=bool))], 4)
    plain = LabelledBatches(pool, (8, 8, 8), 3, seed=7).batch(0, 2)
    flipped = LabelledBatches(pool, (8, 8, 8), 3, seed=7, augment={"flip_p": 1.0}).batch(0, 2)
    assert torch.equal(flipped["image"], plain["image"].flip(2, 3, 4))
    assert torch.equal(flipped["label"], plain["label"].flip(2, 3, 4))
    assert flipped["label"].sum() > 0  # pos:neg 9:1 crops hold the object
    inten = LabelledBatches(pool, (8, 8, 8), 3, seed=7, augment={"intensity": 0.1, "intensity_p": 1.0}).batch(0, 2)
    assert torch.equal(inten["label"], plain["label"])
    for a, b in zip(inten["image"], plain["image"], strict=True):
        # a = b * (1 + u) + v: recover u, v from two voxels and check the bounds and the whole crop
        x0, x1 = b.flatten()[:2].tolist()
        y0, y1 = a.flatten()[:2].tolist()
        scale = (y1 - y0) / (x1 - x0)
        shift = y0 - scale * x0
        assert abs(scale - 1) <= 0.1 + 1e-5 and abs(shift) <= 0.1 + 1e-5
        assert torch.allclose(a, b * scale + shift, atol=1e-5)
        assert not torch.allclose(a, b)
    # deterministic per (seed, epoch, index): the same batch again
    again = LabelledBatches(pool, (8, 8, 8), 3, seed=7, augment={"flip_p": 0.5, "rot90_p": 0.5}).batch(0, 2)
    same = LabelledBatches(pool, (8, 8, 8), 3, seed=7, augment={"flip_p": 0.5, "rot90_p": 0.5}).batch(0, 2)
    assert torch.equal(again["image"], same["image"])


def test_schedule_length_shared_by_both_stages():
    from voco.omni.stages import schedule_length

    omni = {"stage1_steps": 40, "stage2_steps": 30}
    assert schedule_length(omni, 0, 40, "1") == 70  # stage 1: steps 1..40 of a 70-step schedule
    assert schedule_length(omni, 40, 70, "2") == 70  # stage 2 resumes it at step 40
    assert schedule_length(omni, 40, 41, "2") == 70  # a shorter stage 2 (--steps 1) keeps the same curve
