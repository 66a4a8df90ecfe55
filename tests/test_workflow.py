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
    assert len(man) > 0 and set(man["status"]) <= {"ok", "rejected"}
    assert (man["status"] == "ok").all(), man[["case_id", "reason"]]
    assert man["case_id"].is_unique
    for sub in ("synth", "convert", "preprocess", "merge_manifest"):
        assert any((tmp_path / "logs" / sub).rglob("*.log")), f"no log for {sub}"


@pytest.mark.slow
def test_local_btcv_copy_runs_its_evaluation(tmp_path):
    """A newcomer's path: a local BTCV-like folder in MSD layout, named in `download.local`, evaluated with one target.

    The folder is made from phantom data (BTCV itself is licence-gated); the card is the shipped btcv card with the
    laptop spacing / ROI so that the test stays fast.
    """
    from voco.cli import main as voco_main

    raw = tmp_path / "BTCV"
    assert voco_main(["synth", "--dataset", "phantom_organs", "--out", str(raw), "--n-cases", "4"]) == 0
    cards = tmp_path / "cards"
    cards.mkdir()
    card = yaml.safe_load((REPO / "config/datasets/btcv.yaml").read_text())
    card["preprocess"] = {"spacing": [4.0, 4.0, 4.0], "roi": [32, 32, 32]}
    card["finetune"] = {}
    (cards / "btcv.yaml").write_text(yaml.safe_dump(card))
    ov = tmp_path / "my_data.yaml"
    ov.write_text(yaml.safe_dump({
        "cards_dir": str(cards),
        "download": {"local": {"btcv": str(raw)}},
        "datasets": {"pretrain": [], "downstream": ["btcv"]},
        "finetune": {"inits": ["scratch"], "methods": ["plain"], "medcontext_datasets": [], "seeds": [0],
                     "steps": 4},
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

    s = json.loads(summaries[0].read_text())
    assert s, "empty summary"
    assert (wd / "results/btcv/report/report.md").read_text().strip()
