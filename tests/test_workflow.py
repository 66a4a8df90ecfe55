"""The Snakemake DAG: dry run of the whole default DAG, lint, and a real run of the data phase in a temp workdir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
SNAKEFILE = REPO / "workflow" / "Snakefile"


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's `voco`
    return env


def smk(*args, cwd=REPO, timeout=600):
    return subprocess.run([*SNAKEMAKE, "-s", str(SNAKEFILE), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def test_dry_run_all_resolves_from_repo_root(tmp_path):
    r = smk("-n", "all", "--directory", str(tmp_path), "--quiet", "rules")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for rule in ("synth", "convert", "preprocess", "merge_manifest"):
        assert re.search(rf"\b{rule}\b", out), f"rule {rule} not scheduled:\n{out[-2000:]}"


def test_jobs_grow_with_shards_not_cases(tmp_path):
    counts = {}
    for shards in (1, 3):
        ov = tmp_path / f"s{shards}.yaml"
        ov.write_text(yaml.safe_dump({"preprocess": {"shards": shards}}))
        wd = tmp_path / f"wd{shards}"
        wd.mkdir()
        r = smk("-n", "preprocess_all", "--directory", str(wd), "--configfile", str(REPO / "config/config.yaml"),
                str(ov), "--quiet", "rules")
        assert r.returncode == 0, r.stderr[-3000:]
        m = re.search(r"^preprocess\s+(\d+)", r.stdout + r.stderr, re.M)
        assert m, (r.stdout + r.stderr)[-2000:]
        counts[shards] = int(m.group(1))
    n_datasets = counts[1]
    assert counts[3] == 3 * n_datasets


def test_lint_is_clean():
    r = smk("--lint", timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


@pytest.mark.slow
def test_data_phase_runs_for_real(tmp_path):
    """synth -> convert -> preprocess (2 shards) -> merge for one phantom dataset, through Snakemake."""
    ov = tmp_path / "tiny.yaml"
    ov.write_text(yaml.safe_dump({"datasets": {"pretrain": ["phantom_src_a"], "downstream": []},
                                  "preprocess": {"shards": 2}}))
    r = smk("--cores", "2", "data/prep/phantom_src_a/manifest.parquet", "--directory", str(tmp_path),
            "--configfile", str(REPO / "config/config.yaml"), str(ov), timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    man = pd.read_parquet(tmp_path / "data/prep/phantom_src_a/manifest.parquet")
    card = yaml.safe_load((REPO / "config/datasets/phantom_src_a.yaml").read_text())
    assert len(man) == card["expected_count"] and set(man["status"]) <= {"ok", "rejected"}
    assert (man["status"] == "ok").all(), man[["case_id", "reason"]]
    assert man["case_id"].is_unique
    for sub in ("synth", "convert", "preprocess", "merge_manifest"):
        assert any((tmp_path / "logs" / sub).rglob("*.log")), f"no log for {sub}"


@pytest.mark.slow
def test_local_btcv_copy_runs_its_evaluation(tmp_path):
    """A newcomer's path: a local BTCV-like folder in MSD layout, named in `download.local`, evaluated with one target.

    The folder is made from phantom data (BTCV itself is licence-gated). The card is the SHIPPED btcv card (1.5 mm,
    ROI 96, 1000 epochs); the user shrinks the run with an override file, which sits above the card: coarser spacing,
    a 32^3 ROI and 4 steps (a user's finetune.steps beats the card's epochs).
    """
    from voco.cli import main as voco_main

    raw = tmp_path / "BTCV"
    assert voco_main(["synth", "--dataset", "phantom_organs", "--out", str(raw), "--n-cases", "4"]) == 0
    ov = tmp_path / "my_data.yaml"
    ov.write_text(yaml.safe_dump({
        "download": {"local": {"btcv": str(raw)}},
        "datasets": {"pretrain": [], "downstream": ["btcv"]},
        "preprocess": {"roi": [32, 32, 32], "regions": {"abdomen": {"spacing": [4.0, 4.0, 4.0], "window": [-175, 250]}}},
        "finetune": {"inits": ["scratch"], "methods": ["plain"], "medcontext_datasets": [], "seeds": [0],
                     "steps": 4, "roi": [32, 32, 32]},
    }))
    wd = tmp_path / "wd"
    wd.mkdir()
    r = smk("--cores", "2", "results/btcv/report/report.md", "--directory", str(wd),
            "--configfile", str(REPO / "config/config.yaml"), str(ov), timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (wd / "data/raw/btcv/SOURCE.json").is_file()
    summaries = list((wd / "results/btcv").rglob("summary.json"))
    assert summaries, "no evaluation summary"
    import json

    run = json.loads(next((wd / "runs/finetune/btcv").rglob("run.json")).read_text())
    assert run["steps"] == 4 and run["training_length"]["from"] == "steps"  # the user's steps beat the card's epochs
    assert run["roi"] == [32, 32, 32]
    s = json.loads(summaries[0].read_text())
    assert s["dataset"] == "btcv" and s["task"] == "segmentation" and s["init"] == "scratch" and s["n_cases"] >= 1
    assert s["primary"]["name"] == "dice" and isinstance(s["primary"]["value"], float)
    assert "btcv" in (wd / "results/btcv/report/report.md").read_text()


def test_card_epochs_become_steps_of_the_run(tmp_path):
    """Without a user steps value, the shipped card's epochs decide the length: epochs x ceil(train cases / batch)."""
    from voco.config import load_card, resolve
    from voco.train.finetune import finetune_params, training_length

    card = load_card("msd_task09_spleen")  # 500 epochs
    params = finetune_params(resolve(overrides=[REPO / "config/experiments/paper.yaml"]), card)
    assert params["epochs"] == 500
    length = training_length(params, 33)
    assert length == {"steps": 500 * 33, "epochs": 500, "train_cases": 33, "batch_size": 1, "steps_per_epoch": 33,
                      "from": "epochs"}
    ov = tmp_path / "u.yaml"
    ov.write_text(yaml.safe_dump({"finetune": {"batch_size": 2}}))
    p2 = finetune_params(resolve(overrides=[REPO / "config/experiments/paper.yaml", ov]), card)
    assert training_length(p2, 33)["steps"] == 500 * 17
