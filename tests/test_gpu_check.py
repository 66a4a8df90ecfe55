"""benchmarks/gpu_check.sh: its smoke mode (toy sizes on the CPU) parses, runs every code path and reports; without a
GPU the real check refuses clearly. (The check itself needs a CUDA machine; it has not run in these tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), OMP_NUM_THREADS="2",
                VOCO_ROOT=str(REPO), CUDA_VISIBLE_DEVICES="")


def test_without_a_gpu_the_check_refuses_and_says_how_to_smoke(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--smoke" in done.stderr


@pytest.mark.slow
def test_smoke_mode_runs_both_parts_and_reports(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--smoke"], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=3000)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "gpu_check: OK" in done.stdout
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    thr = {r["kind"]: r for r in res["throughput"]}
    assert set(thr) == {"pretrain", "finetune"}
    pre = thr["pretrain"]
    assert pre["finite"] and pre["crops_per_step"] == 11 and pre["crops_per_s"] > 0 and pre["steps_per_s"] > 0
    assert 0 < pre["mfu"] < 1 and pre["model_gflop_per_step"] > 1 and pre["peak_rss_gib"] > 0
    runs = {r["run"]: r for r in res["pipeline"]}
    assert list(runs) == ["synth", "preprocess", "pretrain", "finetune", "pretrain-ddp"]
    assert all(r["ok"] for r in runs.values())
    assert runs["pretrain"]["steps_logged"] == 2 and runs["pretrain-ddp"]["steps_logged"] == 2
    # the printed tables carry the figures the GPU run is for
    assert "| step | F | ROI | batch | crops/step | attention | steps/s | crops/s |" in done.stdout
    assert "MFU" in done.stdout and "| pretrain-ddp | 0 |" in done.stdout
