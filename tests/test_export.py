"""``voco export``: each export is loaded with the other tool's own API and reproduces the run's predictions.

* MONAI bundle: ``monai.bundle.ConfigParser`` builds the network from ``configs/inference.json`` (plain MONAI
  SwinUNETR) and loads ``models/model.pt``: its logits equal the run's network's on the run's pre-processed phantom;
  ``monai.bundle.run`` runs the whole bundle (LoadImaged, the run's pre-processing as the bundle's own invertible
  transform, sliding window, Invertd, argmax, SaveImaged) on the phantom scan: its mask equals ``voco predict``'s.
* Hugging Face folder: ``safetensors`` + ``config.json`` alone rebuild the network; with the pre-processing the
  config names, its mask equals ``voco predict``'s voxel for voxel. The model card carries the evaluation's metrics.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from voco.cli import main as voco


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
    """A phantom organ task fine-tuned with a small SwinUNETR (override file: feature 12, 64^3, 3 steps), evaluated,
    one new scan segmented by ``voco predict``, and both exports written."""
    root = tmp_path_factory.mktemp("export")
    ov = root / "small_swin.yaml"
    ov.write_text(yaml.safe_dump({
        "model": {"name": "swinunetr", "feature_size": 12},
        "finetune": {"roi": [64, 64, 64], "steps": 3, "samples_per_volume": 1, "warmup_steps": 0},
        "evaluate": {"overlap": 0.25},
    }))
    o = ["--override", str(ov)]
    raw, prep = root / "raw", root / "prep"
    run = root / "runs/finetune/phantom_organs/scratch/plain/nall-s0"
    res = root / "results/phantom_organs/scratch/plain/nall-s0"
    assert voco(["synth", "--dataset", "phantom_organs", "--out", str(raw), "--n-cases", "3"]) == 0
    assert voco(["convert", "--input", str(raw), "--dataset", "phantom_organs", "--out", str(root / "nifti")]) == 0
    assert voco(["preprocess", "--dataset-json", str(root / "nifti/dataset.json"), "--out", str(prep),
                 "--dataset", "phantom_organs", "--region", "abdomen", *o]) == 0
    assert voco(["finetune", "--dataset", "phantom_organs", "--init", "scratch", "--prep", str(prep), "--out", str(run),
                 *o]) == 0
    assert voco(["evaluate", "--dataset", "phantom_organs", "--run", str(run), "--prep", str(prep), "--out", str(res),
                 *o]) == 0
    scans = root / "scans"
    scans.mkdir()
    scan = sorted((raw / "imagesTr").glob("*.nii.gz"))[-1]
    (scans / "new_patient.nii.gz").write_bytes(scan.read_bytes())
    assert voco(["predict", "-i", str(scans), "-o", str(root / "masks"), "--run", str(run), *o]) == 0
    for fmt in ("monai-bundle", "hf"):
        assert voco(["export", "--run", str(run), "--format", fmt, "--out", str(root / fmt),
                     "--results", str(root / "results"), *o]) == 0
    return {"root": root, "run": run, "res": res, "scans": scans, "mask": root / "masks/new_patient.nii.gz"}


def _prepared(run_dir: Path, scan: Path):
    from voco.eval.predict import Scan, prepare, preprocess_params, read_scan
    from voco.runs import load_run

    run = load_run(run_dir)
    image, affine = read_scan(Scan("s", "nifti", scan))
    x, meta = prepare(image, affine, preprocess_params(run.preprocess, "run"))
    return run, x, meta


def _same_mask(a: np.ndarray, b: np.ndarray) -> None:
    """The exported MONAI network and voco's own (efficient window attention) differ by float32 rounding (logits equal
    to 1e-5, asserted on a crop above): only a voxel whose two top classes are that close may flip (measured: 1 of
    321,824). A geometry or pre-processing mismatch would move whole organ boundaries."""
    assert a.shape == b.shape
    differ = int((a != b).sum())
    assert differ <= max(1, a.size // 100_000), f"{differ} of {a.size} voxels differ"


@pytest.mark.slow
def test_monai_bundle_loads_and_runs_with_monais_bundle_api(swin_run, tmp_path):
    from monai.bundle import ConfigParser, run

    bundle = swin_run["root"] / "monai-bundle"
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / f).is_file(), f
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    parser.read_meta(str(bundle / "configs/metadata.json"))
    parser["bundle_root"] = str(bundle)
    assert parser["network_def"]["_target_"] == "monai.networks.nets.SwinUNETR"  # no voco needed for the network
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True))
    net.eval()
    voco_run, x, _ = _prepared(swin_run["run"], swin_run["scans"] / "new_patient.nii.gz")
    crop = torch.zeros((1, 1, 64, 64, 64))
    crop[(..., *(slice(0, min(64, n)) for n in x.shape[1:]))] = torch.from_numpy(x[:, :64, :64, :64])
    with torch.no_grad():  # MONAI's window attention vs ours (the run's default, voco.models.window_attention):
        # the same maths in another summation order, so float32 rounding apart
        torch.testing.assert_close(net(crop), voco_run.net(crop), rtol=1e-5, atol=1e-5)
    meta = parser.get("_meta_")
    labels = json.loads(meta["pred_classes"])
    assert labels["1"] == "spleen" and meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 10

    out = tmp_path / "bundle_out"
    run(run_id="run", config_file=str(bundle / "configs/inference.json"),
        meta_file=str(bundle / "configs/metadata.json"), bundle_root=str(bundle), dataset_dir=str(swin_run["scans"]),
        output_dir=str(out))
    assert torch.is_grad_enabled()  # the bundle leaves no global state behind in the caller's process
    mask_b = nib.load(out / "new_patient_seg.nii.gz")
    mask_v = nib.load(swin_run["mask"])
    scan = nib.load(swin_run["scans"] / "new_patient.nii.gz")
    assert mask_b.shape[:3] == scan.shape
    np.testing.assert_allclose(mask_b.affine, scan.affine, atol=1e-4)
    b = np.asanyarray(mask_b.dataobj).reshape(scan.shape)
    v = np.asanyarray(mask_v.dataobj)
    assert len(np.unique(v)) > 1  # the run predicts organs: an equality of two empty masks would prove nothing
    _same_mask(b, v)


def test_bundle_transform_equals_voco_preprocessing(tmp_path):
    """The bundle's copy of the pre-processing (scripts/voco_transforms.py) equals voco's, forward and back."""
    from voco.bundle_transforms import VocoPreprocessd
    from voco.data.preprocess import Params
    from voco.data.store import to_original
    from voco.eval.predict import prepare

    rng = np.random.default_rng(0)
    image = rng.normal(-500, 400, size=(1, 37, 29, 23)).astype(np.float32)
    image[:, 5:30, 4:25, 3:20] += 900
    affine = np.array([[0, 0, -2.5, 40], [-0.8, 0, 0, 10], [0, 1.1, 0, -30], [0, 0, 0, 1]], dtype=float)
    params = Params(spacing=(1.5, 1.5, 2.0), window=(-175, 250), roi=(32, 32, 32))
    ours, meta = prepare(image, affine, params)
    t = VocoPreprocessd("image", params.spacing, params.window, params.roi)
    theirs, geom = t.forward(image, affine)
    np.testing.assert_array_equal(theirs, ours)
    assert geom["shape"] == meta["shape"] and np.allclose(geom["affine"], meta["affine"])
    probs = rng.random((3, *ours.shape[1:])).astype(np.float32)
    back = t.to_original(probs, geom)
    for k in range(3):
        np.testing.assert_array_equal(back[k], to_original(probs[k], meta, order=1, fill=1.0 if k == 0 else 0.0))


@pytest.mark.slow
def test_hf_folder_loads_with_safetensors_and_config_alone(swin_run):
    from safetensors.torch import load_file

    from voco.eval.inference import predict_probs
    from voco.eval.predict import labels_in_original

    hf = swin_run["root"] / "hf"
    cfg = json.loads((hf / "config.json").read_text())
    spec = dict(cfg["network"])
    module, _, cls = spec.pop("_target_").rpartition(".")
    assert module == "monai.networks.nets"
    net = getattr(importlib.import_module(module), cls)(**spec)
    net.load_state_dict(load_file(hf / "model.safetensors"))
    net.eval()
    _, x, meta = _prepared(swin_run["run"], swin_run["scans"] / "new_patient.nii.gz")
    inf = cfg["inference"]
    probs = predict_probs(net, x, inf["roi"], inf["overlap"], inf["sw_batch_size"], inf["blend"])
    mask = labels_in_original(probs, meta)
    _same_mask(mask, np.asanyarray(nib.load(swin_run["mask"]).dataobj))
    record = json.loads((swin_run["run"] / "run.json").read_text())
    assert cfg["preprocess"]["spacing"] == record["preprocess"]["spacing"] and cfg["labels"]["5"] == "liver"
    card = (hf / "README.md").read_text()
    summary = json.loads((swin_run["res"] / "summary.json").read_text())
    assert "## Data" in card and "## Method" in card and "## Metrics" in card
    assert f"{summary['primary']['value']}" in card  # the evaluation's primary metric, from results/
    assert cfg["metrics"]["mean_dice_original"] == pytest.approx(summary["metrics"]["original"]["mean"]["dice"])
