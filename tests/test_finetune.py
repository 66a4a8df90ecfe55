"""Fine-tuning: MedContext pieces (mask, token, EMA teacher, consistency) and the finetune command."""

from __future__ import annotations

import math

import pytest
import torch

from voco.train import medcontext as mc


def test_cosine_momentum_schedule():
    assert mc.cosine_momentum(0, 100) == pytest.approx(0.996)
    assert mc.cosine_momentum(100, 100) == pytest.approx(1.0)
    assert mc.cosine_momentum(50, 100) == pytest.approx(0.998)
    vals = [mc.cosine_momentum(s, 100) for s in range(0, 101, 10)]
    assert all(b >= a for a, b in zip(vals, vals[1:], strict=False))
    assert mc.cosine_momentum(500, 100) == pytest.approx(1.0)


def test_block_mask_fraction_and_depth_repeat():
    g = torch.Generator().manual_seed(0)
    m = mc.block_mask(3, (32, 32, 24), cube=8, ratio=0.4, generator=g)
    assert m.shape == (3, 32, 32, 24) and m.dtype == torch.bool
    cells = m[:, ::8, ::8, 0]  # one voxel per in-plane cell
    assert (cells.flatten(1).sum(1) == round(0.4 * 16)).all()
    assert torch.equal(m, m[..., :1].expand_as(m))  # same in-plane mask at every depth
    assert not torch.equal(m[0], m[1]) or not torch.equal(m[1], m[2])  # per-volume patterns
    # cells are whole cubes: every 8x8 in-plane block is constant
    blocks = m[0, :, :, 0].view(4, 8, 4, 8)
    assert (blocks.amin((1, 3)) == blocks.amax((1, 3))).all()
    # non-divisible sides are cropped, not padded
    assert mc.block_mask(1, (20, 12, 5), cube=16, ratio=0.4).shape == (1, 20, 12, 5)


def test_consistency_loss_forms():
    t = torch.ones(2, 3, 4, 4, 4)
    assert mc.consistency_loss(t.clone(), t).item() == 0.0
    s = t * 2  # per volume ||s-t||^2 / ||t||^2 = 1
    assert mc.consistency_loss(s, t, "paper").item() == pytest.approx(1.0)
    assert mc.consistency_loss(s, t, "reference").item() == pytest.approx(1.0 / math.sqrt(t.numel()))
    with pytest.raises(ValueError, match="loss_form"):
        mc.consistency_loss(s, t, "other")


def test_ema_teacher_update():
    student = torch.nn.Linear(3, 2)
    teacher = mc.EmaTeacher(student)
    assert all(not p.requires_grad for p in teacher.model.parameters())
    before = teacher.model.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student, 0.9)
    assert torch.allclose(teacher.model.weight, 0.9 * before + 0.1 * student.weight)
    teacher.update(student, 1.0)  # momentum 1: the teacher no longer moves
    w = teacher.model.weight.clone()
    with torch.no_grad():
        student.weight.add_(5.0)
    teacher.update(student, 1.0)
    assert torch.equal(teacher.model.weight, w)


def _dicece():
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def test_medcontext_losses_cnn_token_level():
    from voco.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 3, feature_size=4)
    teacher = mc.EmaTeacher(model)
    token = mc.MaskToken(model, in_channels=1)
    assert token.level == "token" and token.token.shape == (4,)  # the stem's 4 channels
    x = torch.rand(2, 1, 16, 16, 16)
    y = torch.randint(0, 3, (2, 1, 16, 16, 16))
    mask = mc.block_mask(2, (16, 16, 16), cube=8, ratio=0.5)
    out = mc.medcontext_losses(model, teacher, token, x, y, _dicece(), mask, beta=0.5)
    assert out["total"].item() == pytest.approx((out["clean"] + out["masked"] + 0.5 * out["consistency"]).item())
    assert out["consistency"].item() > 0  # the masked view differs from the teacher's clean view
    out["total"].backward()
    assert token.token.grad is not None and token.token.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_mask_token_replaces_cnn_stem_tokens_in_masked_cubes():
    """cnn_small: the stem embeds every voxel, so its output is the token map: inside the masked cubes every token
    equals the learnable token, outside it is the clean stem output."""
    from voco.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 3, feature_size=4).eval()
    token = mc.MaskToken(model)
    x = torch.rand(1, 1, 16, 16, 16)
    mask = torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    mask[:, :8, 8:, :] = True  # one 8x8 in-plane cell, all depths
    seen = {}
    hook = model.stem.register_forward_hook(lambda _m, _i, out: seen.__setitem__("stem", out.detach().clone()))
    with torch.no_grad():
        model(x)
        clean = seen["stem"]
        with token.masked(model, mask) as prepare:
            assert prepare(x) is x
            model(x)
    hook.remove()
    # the recording hook ran before the masking hook: recompute what the next layer received
    masked = mc.blend_token(seen["stem"], mask, token.token.detach())
    assert torch.equal(masked[:, :, :8, 8:, :], token.token.detach().view(1, 4, 1, 1, 1).expand(1, 4, 8, 8, 16))
    assert torch.equal(masked[:, :, 8:, :, :], clean[:, :, 8:, :, :])
    assert not model.stem._forward_hooks


@pytest.mark.slow
def test_mask_token_hooks_swin_patch_embedding():
    from voco.models import build_model

    torch.manual_seed(0)
    model = build_model("swinunetr", 1, 2, feature_size=12, depths=(1, 1, 1, 1))
    token = mc.MaskToken(model)
    assert token.level == "token" and token.token.shape == (12,)
    x = torch.rand(1, 1, 64, 64, 64)  # SwinUNETR needs >= 64^3 (instance norm on the 1^3 bottleneck fails)
    mask = mc.block_mask(1, (64, 64, 64), cube=16, ratio=0.4)
    model.eval()
    with torch.no_grad():
        clean = model(x)
    seen = {}
    with token.masked(model, mask) as prepare:
        # registered after the masking hook, so it records what encoder1 receives
        rec = model.encoder1.register_forward_pre_hook(lambda _m, args: seen.__setitem__("enc1", args[0].detach()))
        assert prepare(x) is x  # the input is untouched: the tokens are replaced inside
        masked = model(x)
    rec.remove()
    masked.sum().backward()
    assert not torch.allclose(clean, masked)
    assert token.token.grad is not None and token.token.grad.abs().sum() > 0
    # the masked view reaches encoder1 too (the released code feeds it the clean input): masked voxels hold the
    # learnable input token, the others the image
    enc1 = seen["enc1"]
    m = mask[:, None]
    assert torch.allclose(enc1[m], token.input_token.detach().expand_as(enc1)[m])
    assert torch.equal(enc1[~m], x[~m])
    assert token.input_token.grad is not None and token.input_token.grad.abs().sum() > 0
    assert not model.swinViT.patch_embed._forward_hooks  # the hooks are removed after the context
    assert not model.encoder1._forward_pre_hooks


# ------------------------------------------------------------------------------------- the finetune command
import json  # noqa: E402

from voco.cli import main as voco  # noqa: E402


def _phantom_store(tmp_path_factory, dataset: str, n_cases: int):
    root = tmp_path_factory.mktemp(dataset)
    assert voco(["synth", "--dataset", dataset, "--out", str(root / "raw"), "--n-cases", str(n_cases)]) == 0
    assert voco(["preprocess", "--dataset-json", str(root / "raw" / "dataset.json"), "--out", str(root / "prep"),
                 "--dataset", dataset]) == 0
    return root


@pytest.fixture(scope="module")
def organs(tmp_path_factory):
    """phantom_organs, first 5 cases only (all in its training split: the val fallback is used)."""
    return _phantom_store(tmp_path_factory, "phantom_organs", 5)


@pytest.fixture(scope="module")
def cls_task(tmp_path_factory):
    return _phantom_store(tmp_path_factory, "phantom_cls", 8)


def test_splits_and_label_subsets(organs, cls_task):
    from voco.config import load_card
    from voco.data.store import Store
    from voco.train.finetune import case_class, select_train, split_cases

    store = Store(organs / "prep")
    s = split_cases(store, load_card("phantom_organs"))
    assert s.test == [] and s.eval_split == "val" and len(s.val) == 1  # 20 % of 5
    assert set(s.train).isdisjoint(s.val) and len(s.train) == 4
    assert split_cases(store, load_card("phantom_organs")) == s  # deterministic
    a, b = select_train(s.train, 2, seed=0), select_train(s.train, 2, seed=1)
    assert len(a) == 2 and set(a) <= set(s.train) and select_train(s.train, 2, seed=0) == a
    assert a != b or select_train(s.train, 2, seed=2) != a  # the subset depends on the seed
    cstore = Store(cls_task / "prep")
    cs = split_cases(cstore, load_card("phantom_cls"))
    assert {case_class(cstore, c) for c in cs.val} == {0, 1}  # stratified: AUC is defined on the held-out cases


def test_finetune_from_released_style_file(organs, tmp_path):
    """--init file with a wrapped checkpoint (module. prefixes, another head size): head excluded, rest loaded."""
    import torch

    from voco.models import build_model

    src = build_model("cnn_small", 1, 21)
    ckpt = tmp_path / "released.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, ckpt)
    out = tmp_path / "run"
    rc = voco(["finetune", "--dataset", "phantom_organs", "--init", "file", "--init-path", str(ckpt),
               "--n-train", "2", "--seed", "1", "--prep", str(organs / "prep"), "--out", str(out), "--steps", "3"])
    assert rc == 0
    t = json.loads((out / "transfer.json").read_text())
    assert t["init"] == "file" and t["source"] == str(ckpt)
    assert t["excluded"] and all(n.startswith("out.") for n in t["excluded"])
    assert any(n.startswith("stem.") for n in t["loaded"]) and not t["mismatched"]
    run = json.loads((out / "run.json").read_text())
    assert run["n_train"] == 2 and run["n_train_used"] == 2 and run["init_source"] == str(ckpt)
    assert run["arch"]["out_channels"] == 10  # the card's 9 organs + background


def test_missing_pretrained_init_is_a_clear_error(organs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/pretrain/default/stage2/ does not exist here
    rc = voco(["finetune", "--dataset", "phantom_organs", "--init", "stage2", "--prep", str(organs / "prep"),
               "--out", str(tmp_path / "run"), "--steps", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "runs/pretrain/default/stage2" in err and "final.pt" in err


@pytest.mark.slow
def test_medcontext_run_logs_terms_and_resumes(organs, tmp_path):
    import torch

    out = tmp_path / "mc"
    args = ["finetune", "--dataset", "phantom_organs", "--init", "scratch", "--method", "medcontext",
            "--prep", str(organs / "prep"), "--out", str(out), "--steps", "4"]
    assert voco(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert {"dice_ce", "dice_ce_masked", "consistency", "total"} <= set(lines[-1])
    assert lines[-1]["consistency"] > 0
    before = torch.load(out / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith(("student.", "token.")) for k in before)  # model.pt holds the plain network
    assert not (out / "final.pt").exists()  # the resumable checkpoint goes once the outputs exist
    assert voco(args) == 0  # complete (run.json of the same identity): trains nothing, same weights
    after = torch.load(out / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4

    # the resumable checkpoint of a MedContext run holds the learnable mask token and the EMA teacher
    from test_resume_identity import _sigterm_after

    part = tmp_path / "mc_part"
    t = _sigterm_after(part / "metrics.jsonl", 2)
    assert voco([*args[:-4], "--out", str(part), "--steps", "200"]) == 75
    t.join()
    last = torch.load(part / "last.pt", weights_only=True)
    assert last["method"] == "medcontext" and last["ema"] is not None and last["step"] >= 2
    assert any(k.startswith("token.") for k in last["model"])


@pytest.mark.slow
def test_classification_finetune_and_evaluate(cls_task, tmp_path):
    run, res = tmp_path / "run", tmp_path / "res"
    assert voco(["finetune", "--dataset", "phantom_cls", "--init", "scratch", "--prep", str(cls_task / "prep"),
                 "--out", str(run), "--steps", "6"]) == 0
    assert voco(["finetune", "--dataset", "phantom_cls", "--init", "scratch", "--method", "medcontext",
                 "--prep", str(cls_task / "prep"), "--out", str(tmp_path / "bad"), "--steps", "1"]) == 2
    assert voco(["evaluate", "--dataset", "phantom_cls", "--run", str(run), "--prep", str(cls_task / "prep"),
                 "--out", str(res)]) == 0
    s = json.loads((res / "summary.json").read_text())
    assert s["task"] == "classification" and s["split"] == "val" and s["primary"]["name"] == "auc"
    cases = (res / "cases.csv").read_text().splitlines()
    assert cases[0] == "case_id,class,pred,prob_0,prob_1" and len(cases) == 1 + s["n_cases"]
    # the summary's accuracy and AUC are those of the per-case predictions (AUC by pairwise ranking, ties half)
    import pandas as pd

    df = pd.read_csv(res / "cases.csv")
    assert (df["pred"] == df[["prob_0", "prob_1"]].to_numpy().argmax(1)).all()
    assert s["metrics"]["accuracy"] == pytest.approx(float((df["pred"] == df["class"]).mean()))
    pos, neg = df.loc[df["class"] == 1, "prob_1"].to_numpy(), df.loc[df["class"] == 0, "prob_1"].to_numpy()
    assert len(pos) and len(neg)  # stratified held-out cases: AUC is defined
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    assert s["metrics"]["auc"] == pytest.approx(sum(pairs) / len(pairs)) == s["primary"]["value"]
    assert "head.weight" in __import__("torch").load(run / "model.pt", weights_only=True)["model"]


def test_finetune_dicece_excludes_background_by_default():
    """finetune.include_background (default false, the reference): the Dice term averages the foreground channels only;
    CE covers every class. Written out: a prediction that is right everywhere gives ~0 either way, and MONAI's own
    loss with include_background=False is what the default computes."""
    from monai.losses import DiceCELoss

    from voco.train.finetune import dicece_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, 6, generator=g)
    y = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=g)
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)(logits, y)
    assert torch.allclose(dicece_loss()(logits, y), ref)
    assert torch.allclose(dicece_loss(True)(logits, y), DiceCELoss(to_onehot_y=True, softmax=True)(logits, y))
    # all background except one foreground voxel, predicted perfectly: Dice over foreground = 0, with background > 0
    y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    y[0, 0, 0, 0, 0] = 1
    logits = torch.full((1, 2, 4, 4, 4), -20.0)
    logits[:, 0] = 20.0
    logits[0, 1, 0, 0, 0], logits[0, 0, 0, 0, 0] = 20.0, -20.0
    assert float(dicece_loss()(logits, y)) < 1e-4
    from voco.config import load_yaml, schema_path

    ft = load_yaml(schema_path())["properties"]["finetune"]["properties"]
    assert ft["include_background"]["default"] is False
