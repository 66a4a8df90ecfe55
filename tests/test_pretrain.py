"""`voco pretrain --method voco|voco-v1` end to end on small real stores (manifest + memory-mapped cases)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from voco.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _phantom(rng: np.random.Generator, shape=(56, 56, 20)) -> np.ndarray:
    """A body-like ellipse with a few bright 'organs' at subject-specific positions, values in [0, 1]."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    img = 0.3 * ((x / 0.9) ** 2 + (y / 0.8) ** 2 < 1)
    for cx, cy, val in [(-0.4, -0.3, 0.6), (0.35, -0.2, 0.8), (0.0, 0.45, 0.95), (0.5, 0.5, 0.45)]:
        cx, cy = cx + rng.normal(0, 0.05), cy + rng.normal(0, 0.05)
        img = np.where((x - cx) ** 2 + (y - cy) ** 2 + 0.2 * z**2 < 0.06, val, img)
    return (img + rng.normal(0, 0.02, shape)).clip(0, 1).astype(np.float32)


def make_store(root: Path, dataset: str, region: str, n: int, seed: int) -> Path:
    from voco.data.store import write_case, write_manifest

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cid = f"{dataset}_{i:03d}"
        img = _phantom(rng)
        rel = write_case(root, cid, img[None], {}, None, {"spacing": [4.0, 4.0, 4.0], "region": region})
        rows.append({"case_id": cid, "dataset": dataset, "region": region, "status": "ok", "reason": "",
                     "shape": list(img.shape), "spacing": [4.0, 4.0, 4.0], "split": "train", "labelled": False,
                     "key": f"k{i}", **rel})
    rows.append({"case_id": f"{dataset}_bad", "dataset": dataset, "region": region, "status": "rejected",
                 "reason": "test", "split": "train", "labelled": False, "image": "", "label": "", "label_full": ""})
    write_manifest(rows, root / "manifest.parquet")
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("prep")
    return [make_store(base / "abd", "abd", "abdomen", 4, 0), make_store(base / "chest", "chest", "chest", 2, 1)]


def _override(tmp_path: Path, **pretrain) -> Path:
    ov = {
        "model": {"name": "cnn_small", "feature_size": 4},
        "pretrain": {"batch_size": 2, "lr": 1e-3, "warmup": 1, "checkpoint_every": 2, "num_workers": 0,
                     "voco": {"grid": 3, "roi": 16, "sw": 2, "hidden_dim": 32, "out_dim": 32,
                              "v1": {"grid": 2, "roi": 16, "out_size": 16, "hidden_dim": 32, "out_dim": 32}}},
    }
    ov["pretrain"].update(pretrain)
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(ov))
    return path


@pytest.mark.slow
def test_pretrain_voco_writes_checkpoints_that_transfer(tmp_path, stores):
    from voco.cli import main
    from voco.models import build_model, load_pretrained

    out = tmp_path / "runs" / "ssl"
    argv = ["pretrain", "--method", "voco", "--prep", *map(str, stores), "--out", str(out), "--steps", "3",
            "--override", str(_override(tmp_path))]
    assert main(argv) == 0
    for name in ("final.pt", "backbone.pt", "metrics.jsonl", "progress.png", "summary.json"):
        assert (out / name).is_file(), name
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert {"total", "pred", "inter", "reg", "acc", "lr", "crops_per_s"} <= set(recs[-1])
    for r in recs:
        # L_SSL = L_pred + L_inter + L_reg (unit weights); accuracy over B * sw = 4 position queries: a multiple of 1/4
        assert r["total"] == pytest.approx(r["pred"] + r["inter"] + r["reg"], rel=1e-5)
        assert r["acc"] * 4 == pytest.approx(round(r["acc"] * 4)) and 0 <= round(r["acc"] * 4) <= 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["volumes"] == 6 and summary["chance"] == pytest.approx(1 / 9)
    assert summary["steps"] == 3 and summary["pretext_acc_final"] == pytest.approx(recs[-1]["acc"])  # last 10 %
    ck = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert ck["stage"] == "ssl" and ck["method"] == "voco" and ck["step"] == 3 and ck["ema"] is not None
    assert ck["config"]["model"]["name"] == "cnn_small"

    # backbone.pt: our backbone names, loads completely into a fresh segmentation model except the output layer
    fresh = build_model("cnn_small", out_channels=5, feature_size=4)
    rep = load_pretrained(fresh, out / "backbone.pt")
    assert set(rep.missing) == {"out.weight", "out.bias"} and not rep.skipped
    blob = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    bb = blob["model"]
    assert torch.equal(fresh.state_dict()["enc.3.conv.weight"], bb["enc.3.conv.weight"])
    # self-describing: architecture, the corpus' pre-processing (per store) and the preprocessing version
    meta = blob["meta"]
    assert meta["format"] == "voco-model/1" and meta["kind"] == "backbone"
    assert meta["architecture"]["name"] == "cnn_small" and meta["architecture"]["args"]["feature_size"] == 4
    prep = meta["preprocess"]["datasets"]
    assert set(prep) == {"abd", "chest"} and all(p["spacing"] == [4.0, 4.0, 4.0] for p in prep.values())
    # final.pt loads the same way: backbone. stripped, projector tensors reported as not in the model
    rep2 = load_pretrained(build_model("cnn_small", out_channels=5, feature_size=4), out / "final.pt")
    assert rep2.skipped and all(k.startswith("projector.") for k in rep2.skipped)
    assert set(rep2.loaded) == set(rep.loaded)

    # a second call finds final.pt and does nothing
    assert main(argv) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_pretrain_voco_v1(tmp_path, stores):
    from voco.cli import main

    out = tmp_path / "v1"
    argv = ["pretrain", "--method", "voco-v1", "--prep", *map(str, stores), "--out", str(out), "--steps", "2",
            "--override", str(_override(tmp_path))]
    assert main(argv) == 0
    ck = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert ck["method"] == "voco-v1"
    # v1 teacher: an EMA network of its own (backbone + projector)
    assert any(k.startswith("backbone.") for k in ck["ema"]["module"])
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # v1 has no L_inter (total = L_pred + L_reg); its accuracy is over B * sw = 4 queries among g^2 = 4 positions
    assert rec["inter"] == 0.0 and rec["total"] == pytest.approx(rec["pred"] + rec["reg"], rel=1e-5)
    assert rec["acc"] * 4 == pytest.approx(round(rec["acc"] * 4))
    assert json.loads((out / "summary.json").read_text())["chance"] == pytest.approx(1 / 4)


def test_ddp_batches_are_the_single_process_batch_split_by_rank(stores):
    from voco.ssl.crops import CropAugment
    from voco.train.pretrain_ssl import SSLBatches, collect_volumes

    vols = collect_volumes(stores)
    assert len(vols) == 6  # the rejected case is left out
    ssl = {"grid": 3, "roi": 16, "sw": 2, "augment": CropAugment.none().__dict__}
    one = SSLBatches(vols, 4, ssl, "voco", seed=3)
    b_one = next(iter(one(0)))
    parts = []
    for rank in (0, 1):
        two = SSLBatches(vols, 2, ssl, "voco", seed=3)
        two.world, two.rank = 2, rank
        two.steps_per_epoch = one.steps_per_epoch
        parts.append(next(iter(two(0))))
    for key in ("rand", "base", "labels"):
        assert torch.equal(torch.cat([p[key] for p in parts]), b_one[key]), key
    # resuming mid-epoch (start=1) gives the same batch as draining the first one
    it = iter(one(0))
    next(it)
    assert torch.equal(next(iter(one(0, 1)))["rand"], next(it)["rand"])


def test_dispatch_by_method_and_stage():
    from voco.commands.pretrain import resolve

    def ns(method, stage):
        return argparse.Namespace(method=method, stage=stage)

    cfg = {"pretrain": {"method": "voco"}}
    assert resolve(ns(None, "ssl"), cfg) == ("voco.train.pretrain_ssl", "run_ssl")
    assert resolve(ns("voco-v1", "ssl"), cfg) == ("voco.train.pretrain_ssl", "run_ssl")
    # the omni stages and SuPreM live in their own modules (voco.omni); only the function names are fixed here
    assert resolve(ns("voco", "1"), cfg)[1] == "run_stage" == resolve(ns("voco", "2"), cfg)[1]
    assert resolve(ns("suprem", "ssl"), cfg)[1] == "run_suprem"
    with pytest.raises(ConfigError, match="suprem"):
        resolve(ns("suprem", "2"), cfg)


def test_empty_corpus_is_a_data_error(tmp_path):
    from voco.data.store import write_manifest
    from voco.errors import DataError
    from voco.train.pretrain_ssl import collect_volumes

    write_manifest([{"case_id": "x", "dataset": "d", "region": "abdomen", "status": "rejected", "split": "train",
                     "labelled": False, "image": ""}], tmp_path / "manifest.parquet")
    with pytest.raises(DataError, match="empty"):
        collect_volumes([tmp_path])


@pytest.mark.slow
def test_nproc_2_relaunches_under_torchrun(tmp_path, stores):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", VOCO_ROOT=str(REPO))
    voco = str(Path(sys.executable).parent / "voco")
    cmd = [voco, "pretrain", "--method", "voco", "--prep", *map(str, stores), "--out", str(out), "--steps", "2",
           "--nproc", "2", "--override", str(_override(tmp_path, batch_size=1))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    ck = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert "launching 2 DDP processes" in done.stderr


def test_voco_v1_teacher_has_its_own_init_and_no_feature_dropout():
    """CVPR VoCo: the teacher network is built from its own random init (not a copy of the student) and has no
    feature dropout; after one EMA step theta_t = 0.9 theta_t0 + 0.1 theta_s."""
    from voco.ssl.heads import FeatureDropout
    from voco.train.pretrain_ssl import build_ssl, ssl_settings

    cfg = {"model": {"name": "cnn_small", "feature_size": 4},
           "pretrain": {"voco": {"feature_dropout_p": 0.2,
                                 "v1": {"grid": 2, "roi": 16, "out_size": 16, "hidden_dim": 32, "out_dim": 32}}}}
    ssl = ssl_settings(cfg, "voco-v1")
    torch.manual_seed(0)
    student, teacher = build_ssl(cfg, "voco-v1", ssl)
    s_params, t_params = dict(student.named_parameters()), dict(teacher.module.named_parameters())
    assert s_params.keys() == t_params.keys()
    # every randomly initialised tensor (conv / linear weights) differs; norms start at 1 / 0 in both
    assert all(not torch.equal(s_params[k], t_params[k]) for k in s_params if s_params[k].ndim >= 2)
    assert all(t.data_ptr() != s.data_ptr() for t, s in zip(t_params.values(), s_params.values(), strict=True))
    assert student.dropout.p == 0.2 and isinstance(teacher.module.dropout, FeatureDropout)
    assert teacher.module.dropout.p == 0.0 and not teacher.module.training
    t0 = {k: v.clone() for k, v in t_params.items()}
    teacher.update(student)
    for k, v in teacher.module.named_parameters():
        torch.testing.assert_close(v, 0.9 * t0[k] + 0.1 * s_params[k].detach())
    # the voco (TPAMI) teacher is a projector of its own init over the shared backbone
    student, teacher = build_ssl(cfg, "voco", ssl_settings(cfg, "voco"))
    assert not any(n.startswith("backbone") for n, _ in teacher.module.named_parameters())
    assert not torch.equal(teacher.module.layer1[0].weight, student.projector.layer1[0].weight)
