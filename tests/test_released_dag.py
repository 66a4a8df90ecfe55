"""A DAG run whose fine-tuning init is a released-format checkpoint (official key names, ``module.backbone.``
prefixes, ``state_dict`` wrapper, projection heads), named in ``finetune.inits`` as ``file:<path>``, through evaluation
and ``rule predict`` on a new scan. Shrunk the way a user would: an override file (one dataset, one seed, one step)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from test_released import released_file

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dag_with_a_released_format_init_completes(tmp_path):
    from voco.cli import main as voco

    weights = tmp_path / "weights" / "VoCo_B_SSL_head.pt"
    weights.parent.mkdir()
    released_file(weights, "voco_ssl_head")
    wd = tmp_path / "wd"
    scans = wd / "data" / "predict" / "mine"
    assert voco(["synth", "--dataset", "phantom_organs", "--out", str(tmp_path / "new"), "--n-cases", "1"]) == 0
    scan = next((tmp_path / "new" / "imagesTr").glob("*.nii.gz"))
    scans.mkdir(parents=True)
    (scans / "patient_1.nii.gz").write_bytes(scan.read_bytes())
    ov = tmp_path / "released.yaml"
    ov.write_text(yaml.safe_dump({
        "datasets": {"pretrain": [], "downstream": ["phantom_organs"]},
        "model": {"name": "swinunetr", "size": "B"},
        "finetune": {"inits": [f"file:{weights}"], "methods": ["plain"], "medcontext_datasets": [],
                     "seeds": [0], "steps": 1, "samples_per_volume": 1, "roi": [64, 64, 64], "warmup_steps": 0},
        "evaluate": {"overlap": 0.25, "sw_batch_size": 2},
    }))
    run = "phantom_organs/file-VoCo_B_SSL_head/plain/nall-s0"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow/Snakefile"), "--cores", "2",
                        "results/phantom_organs/report/report.md", f"results/predict/mine/{run}",
                        "--directory", str(wd), "--configfile", str(REPO / "config/config.yaml"), str(ov)],
                       cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    transfer = json.loads((wd / "runs/finetune" / run / "transfer.json").read_text())
    assert transfer["layout"] == "voco_ssl_head" and transfer["source"] == str(weights)
    assert transfer["encoder"]["missing"] == [] and transfer["encoder"]["loaded"] == transfer["encoder"]["model"]
    assert transfer["heads"] == {"VoCo projection head": 6, "VoCo EMA projection head": 6}
    summary = json.loads((wd / "results" / run / "summary.json").read_text())
    assert summary["init"] == "file-VoCo_B_SSL_head" and summary["n_cases"] == 4
    table = (wd / "results/phantom_organs/report/report.md").read_text()
    assert "file-VoCo_B_SSL_head" in table
    out = wd / "results/predict/mine" / run
    rep = json.loads((out / "predict.json").read_text())
    assert rep["n_ok"] == 1 and rep["n_failed"] == 0
    mask, src = nib.load(out / "patient_1.nii.gz"), nib.load(scans / "patient_1.nii.gz")
    assert mask.shape == src.shape
    np.testing.assert_array_equal(mask.affine, src.affine)
    assert (wd / "logs/predict/mine" / f"{run}.log").is_file()


def test_predict_target_plans_the_run_it_needs(tmp_path):
    """`rule predict` pulls in the fine-tuning run (and its init's pre-training) of the target it is asked for."""
    (tmp_path / "data/predict/mine").mkdir(parents=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow/Snakefile"), "-n", "--quiet",
                        "rules", "--directory", str(tmp_path), "--",
                        "results/predict/mine/phantom_organs/stage2/plain/nall-s0"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    assert counts.get("predict") == "1" and counts.get("finetune") == "1" and counts.get("pretrain_stage2") == "1"
