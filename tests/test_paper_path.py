"""The paper path on a real CT: the shipped paper configuration and the shipped msd_task09_spleen card, end to end.

The real TotalSegmentator CT (3 mm, TotalSegmentator 2.18.0's reference files) and its real spleen label, laid out as a
user's local MSD Task09 copy, go through: convert -> preprocess (the card: 1.5 mm, -175..250 HU, ROI 96) -> one VoCo
step with SwinUNETR-B (64^3 crops, grid 3, gradient checkpointing) -> one fine-tuning step on the card from that
backbone -> evaluation (NSD at 1 mm, original geometry too). Shrunk only the way a user shrinks a run, with
command-line flags: `--steps 1`, one volume per SSL step, two crops per fine-tuning step, and evaluation at the paper's
second overlap 0.5 only (0.75 quadruples the 96^3 windows: ~8 CPU-minutes for one volume here).

SwinUNETR-B on this CPU costs minutes and ~10 GB: one such test per CI run (MACHINE-NOTES.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "experiments" / "paper.yaml"
DATASET = "msd_task09_spleen"
SPLEEN = 1  # TotalSegmentator v2 class id of the spleen (totalsegmentator/map_to_binary.py)

pytestmark = pytest.mark.slow


def voco(*args: str, cwd: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    r = subprocess.run([str(Path(sys.executable).parent / "voco"), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"voco {' '.join(args)} failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-5000:]}"
    return r


def _spleen_copy(ref: Path, dest: Path) -> Path:
    """The user's local MSD Task09 copy: the real CT crop + its real spleen label (train), another crop (test)."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (dest / sub).mkdir(parents=True)
    ct_sm, seg = nib.load(ref / "example_ct_sm.nii.gz"), nib.load(ref / "example_seg.nii.gz")
    nib.save(ct_sm, dest / "imagesTr" / "spleen_1.nii.gz")
    nib.save(nib.Nifti1Image((np.asarray(seg.dataobj) == SPLEEN).astype(np.uint8), seg.affine),
             dest / "labelsTr" / "spleen_1.nii.gz")
    ct, full = nib.load(ref / "example_ct.nii.gz"), nib.load(ref / "example_seg_fast_force_split.nii.gz")
    z0, z1 = 74, 112  # the upper abdomen of the full CT, spleen included (another extent than the training crop)
    aff = ct.affine.copy()
    aff[:3, 3] = ct.affine[:3, :3] @ np.array([0, 0, z0]) + ct.affine[:3, 3]
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj)[:, :, z0:z1].astype(np.int16), aff),
             dest / "imagesTs" / "spleen_2.nii.gz")
    lab = (np.asarray(full.dataobj)[:, :, z0:z1] == SPLEEN).astype(np.uint8)
    assert lab.sum() > 1000
    nib.save(nib.Nifti1Image(lab, aff), dest / "labelsTs" / "spleen_2.nii.gz")
    (dest / "dataset.json").write_text(json.dumps({
        "name": "Spleen (a user's copy)", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"}],
        "test": [{"image": "./imagesTs/spleen_2.nii.gz", "label": "./labelsTs/spleen_2.nii.gz"}]}))
    return dest


def test_real_ct_through_the_paper_configuration(tmp_path, totalseg_ref):
    wd = tmp_path / "wd"
    wd.mkdir()
    raw = _spleen_copy(totalseg_ref, tmp_path / "Task09_Spleen")
    paper = ["--override", str(PAPER)]
    voco("convert", *paper, "--input", str(raw), "--format", "msd", "--dataset", DATASET,
         "--out", str(wd / "nifti"), cwd=wd)
    voco("preprocess", *paper, "--dataset-json", str(wd / "nifti" / "dataset.json"), "--dataset", DATASET,
         "--out", str(wd / "prep"), "--strict", cwd=wd)
    manifest = __import__("pandas").read_parquet(wd / "prep" / "manifest.parquet")
    assert list(manifest["status"]) == ["ok", "ok"], manifest[["case_id", "reason"]]
    assert [round(float(s), 3) for s in manifest["spacing"].iloc[0]] == [1.5, 1.5, 1.5]  # the card's spacing

    ssl = wd / "runs" / "ssl"
    voco("pretrain", *paper, "--prep", str(wd / "prep"), "--out", str(ssl), "--steps", "1", "--batch-size", "1",
         "--num-workers", "0", cwd=wd)
    summary = json.loads((ssl / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["model"]["name"] == "swinunetr"
    first = json.loads((ssl / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(first["total"]) and first["step"] == 1
    ckpt = __import__("torch").load(ssl / "final.pt", map_location="cpu", weights_only=True)
    loop = ckpt["loop"]
    assert loop["lr"] == 1e-4 and loop["warmup"] == 5000 and loop["amsgrad"] is True  # the paper's optimiser
    assert ckpt["config"]["model"]["name"] == "swinunetr" and ckpt["config"]["model"]["use_checkpoint"] is True

    ft = wd / "runs" / "ft"
    voco("finetune", *paper, "--dataset", DATASET, "--init", "ssl", "--init-path", str(ssl / "backbone.pt"),
         "--prep", str(wd / "prep"), "--out", str(ft), "--steps", "1", "--set", "finetune.samples_per_volume=2",
         cwd=wd)
    run = json.loads((ft / "run.json").read_text())
    assert run["roi"] == [96, 96, 96] and run["arch"]["name"] == "swinunetr" and run["steps"] == 1
    transfer = json.loads((ft / "transfer.json").read_text())
    assert transfer["n_loaded"] > 100 and any(n.startswith("swinViT.") for n in transfer["loaded"])

    res = wd / "results"
    voco("evaluate", *paper, "--dataset", DATASET, "--run", str(ft), "--prep", str(wd / "prep"), "--out", str(res),
         "--overlap", "0.5", "--set", "evaluate.extra_overlaps=[]", cwd=wd, timeout=2400)
    s = json.loads((res / "summary.json").read_text())
    assert s["n_cases"] == 1 and s["overlap"] == 0.5 and s["split"] == "test"
    assert "original" in s["metrics"] and "resampled" in s["metrics"]
