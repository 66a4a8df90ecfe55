"""Use the hardware the job has: device choice (--device auto|cpu|cuda), AMP inference (the CUDA code path, run on
CPU with bf16 autocast), DataLoader workers from the job's CPUs, and evaluation's progress bar.

No GPU here: the CUDA branches are the same functions with another device; what needs a real GPU is marked `gpu`."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from voco.errors import ConfigError
from voco.train import distributed as dist

HAS_CUDA = torch.cuda.is_available()


def test_select_device():
    assert dist.select_device("cpu") == torch.device("cpu")
    assert dist.select_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert dist.select_device(None).type == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ConfigError, match="--device must be one of auto, cpu, cuda"):
        dist.select_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: --device cuda is valid here")
def test_device_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"--device cuda, but no CUDA GPU is visible.*CUDA_VISIBLE_DEVICES=''"):
        dist.select_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_device_cuda_with_a_gpu_uses_the_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist.select_device("cuda") == torch.device("cuda", 0)


def test_num_workers_default_to_the_jobs_cpus(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert dist.cpu_count() == 8
    assert dist.resolve_num_workers("auto") == 7  # one CPU left to the training process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes share the job's CPUs
    assert dist.resolve_num_workers("auto") == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert dist.cpu_count() == len(os.sched_getaffinity(0))
    assert dist.resolve_num_workers("auto") == max(0, len(os.sched_getaffinity(0)) - 1)
    assert dist.resolve_num_workers(0) == 0 and dist.resolve_num_workers("3") == 3
    with pytest.raises(ConfigError, match="num_workers"):
        dist.resolve_num_workers("many")
    with pytest.raises(ConfigError, match=">= 0"):
        dist.resolve_num_workers(-1)


def test_config_accepts_num_workers_auto(tmp_path):
    from voco.config import load_config

    ov = tmp_path / "ov.yaml"
    ov.write_text("pretrain:\n  num_workers: auto\nfinetune:\n  num_workers: auto\n")
    cfg = load_config(None, [ov])
    assert cfg["pretrain"]["num_workers"] == "auto" and cfg["finetune"]["num_workers"] == "auto"
    ov.write_text("pretrain:\n  num_workers: lots\n")
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(None, [ov])


def test_amp_inference_path_on_cpu_matches_full_precision():
    """predict_probs under autocast (what CUDA uses; bf16 on CPU here) gives probabilities that agree with fp32."""
    from voco.eval.inference import autocast_for, model_device, predict_probs
    from voco.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 3, feature_size=4).eval()
    img = np.random.default_rng(0).random((20, 24, 18), dtype=np.float32)
    full = predict_probs(model, img, (16, 16, 16), overlap=0.5, amp=False)
    half = predict_probs(model, img, (16, 16, 16), overlap=0.5, amp=True)
    assert full.dtype == half.dtype == torch.float32 and half.shape == (3, 20, 24, 18)
    assert torch.allclose(half.sum(0), torch.ones(20, 24, 18), atol=1e-4)
    assert not torch.equal(full, half)  # autocast really ran in reduced precision
    assert (full - half).abs().max() < 0.05 and (full.argmax(0) == half.argmax(0)).float().mean() > 0.95
    assert model_device(model) == torch.device("cpu")
    # the default is AMP on CUDA only
    assert isinstance(autocast_for("cpu"), type(__import__("contextlib").nullcontext()))
    assert isinstance(autocast_for("cpu", True), torch.autocast)


def test_finetune_crop_loader_workers_give_the_same_batches(tmp_path):
    """Crops are a function of (seed, epoch, index): worker processes change nothing (exact resume holds)."""
    from test_vocomni import FULL, make_store

    from voco.data.store import Store
    from voco.train.finetune import segmentation_batches

    store = Store(make_store(tmp_path / "s", "tiny", FULL, 4, seed=5))
    params = {"roi": [16, 16, 16], "pos_neg": [9, 1], "samples_per_volume": 2, "batch_size": 2}
    ids = store.ids()
    one = list(segmentation_batches(store, ids, params, seed=3, num_workers=0)(1, 0))
    two = list(segmentation_batches(store, ids, params, seed=3, num_workers=2)(1, 0))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    skipped = list(segmentation_batches(store, ids, params, seed=3, num_workers=2)(1, 1))  # resume mid-epoch
    assert len(skipped) == 1 and torch.equal(skipped[0]["image"], one[1]["image"])


@pytest.mark.slow
def test_evaluate_runs_on_the_chosen_device_with_a_progress_bar(tmp_path, capsys, caplog):
    from test_finetune import _phantom_store

    from voco.cli import main as voco

    class _F:  # _phantom_store takes a tmp_path_factory
        @staticmethod
        def mktemp(name):
            p = tmp_path / name
            p.mkdir()
            return p

    root = _phantom_store(_F, "phantom_organs", 5)
    run, res = tmp_path / "run", tmp_path / "res"
    assert voco(["finetune", "--dataset", "phantom_organs", "--init", "scratch", "--prep", str(root / "prep"),
                 "--out", str(run), "--steps", "2", "--device", "auto", "--num-workers", "1"]) == 0
    assert json.loads((run / "run.json").read_text())["device"] == ("cuda:0" if HAS_CUDA else "cpu")
    capsys.readouterr()
    caplog.set_level(logging.INFO)
    assert voco(["evaluate", "--dataset", "phantom_organs", "--run", str(run), "--prep", str(root / "prep"),
                 "--out", str(res), "--device", "cpu"]) == 0
    err = capsys.readouterr().err + caplog.text  # a bar on a terminal, log lines otherwise (pytest holds the root logger)
    assert "evaluate phantom_organs" in err and "1/1" in err and "case" in err  # the bar over the cases
    assert json.loads((res / "summary.json").read_text())["device"] == "cpu"
    if not HAS_CUDA:
        assert voco(["evaluate", "--dataset", "phantom_organs", "--run", str(run), "--prep", str(root / "prep"),
                     "--out", str(tmp_path / "res2"), "--device", "cuda"]) == 2
        assert "--device cuda, but no CUDA GPU is visible" in capsys.readouterr().err
