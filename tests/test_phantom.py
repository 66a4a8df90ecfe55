"""The phantom generator (voco.data.phantom) and ``voco synth``: determinism, anatomy, HU, layout, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from voco.cli import main
from voco.config import load_card
from voco.data import phantom
from voco.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
PHANTOM_CARDS = sorted(p.stem for p in (REPO / "config" / "datasets").glob("phantom_*.yaml"))


def _case(seed: int, **kw) -> phantom.PhantomCase:
    kw.setdefault("spacing_scale", 5.0)
    return phantom.generate_case(phantom.PhantomSettings(**kw), phantom.case_rng(0, 7, seed))


def _centroid_mm(case: phantom.PhantomCase, name: str) -> np.ndarray:
    idx = np.argwhere(case.label == phantom.LABEL_ID[name])
    assert len(idx), f"{name} missing"
    return (case.affine[:3, :3] @ idx.mean(0)) + case.affine[:3, 3]


def test_same_seed_same_volume_and_different_seed_differs():
    a, b, c = _case(1), _case(1), _case(2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine) and a.meta == b.meta
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_organs_sit_at_consistent_relative_positions(seed):
    case = _case(seed, fov="abdomen")
    liver, spleen = _centroid_mm(case, "liver"), _centroid_mm(case, "spleen")
    kr, kl = _centroid_mm(case, "kidney_right"), _centroid_mm(case, "kidney_left")
    spine, aorta, gb = _centroid_mm(case, "spine"), _centroid_mm(case, "aorta"), _centroid_mm(case, "gallbladder")
    # RAS world: +x = patient right, +y = anterior, +z = superior
    assert liver[0] > 30 > -30 > spleen[0]
    assert kr[0] > spine[0] + 25 and kl[0] < spine[0] - 25
    assert spine[1] < aorta[1] < liver[1]  # spine most posterior, aorta just in front of it
    assert gb[1] > kr[1] + 40  # gallbladder anterior to the kidney
    assert liver[2] > kr[2]  # liver above the kidneys


def test_chest_field_of_view_has_lungs_and_heart_above_the_liver():
    case = _case(3, fov="chest")
    names = {phantom.PHANTOM_LABELS[v] for v in np.unique(case.label)}
    assert {"lung_right", "lung_left", "heart", "aorta", "spine"} <= names
    assert _centroid_mm(case, "heart")[2] > _centroid_mm(case, "liver")[2]
    assert _centroid_mm(case, "lung_right")[0] > _centroid_mm(case, "lung_left")[0]


def test_hounsfield_values_are_realistic():
    case = _case(4, fov="mixed", noise_hu=(15.0, 15.0))
    img, lab = case.image, case.label
    assert img.dtype == np.int16 and lab.dtype == np.uint8
    mean = {n: float(img[lab == phantom.LABEL_ID[n]].mean()) for n in ("liver", "spleen", "spine", "aorta")}
    assert 60 < mean["liver"] < 140 and 60 < mean["spleen"] < 150
    assert mean["spine"] > 180 and mean["aorta"] > 110
    assert img[0, 0, :].mean() < -900  # air in the corner
    # noise: neighbouring voxels inside the liver differ, but not wildly
    liver = np.argwhere(lab == phantom.LABEL_ID["liver"])
    assert 5 < float(img[tuple(liver.T)].std()) < 60


def test_tumours_are_labelled_inside_their_host_and_hypodense():
    case = _case(5, tumour_prob=1.0, tumour_sites=("liver",), tumour_radius=(18.0, 22.0))
    t = case.label == phantom.LABEL_ID["liver_tumour"]
    assert case.meta["tumour"] == 1 and t.sum() > 10
    liver = case.label == phantom.LABEL_ID["liver"]
    assert case.image[t].mean() < case.image[liver].mean() - 20
    none = _case(5, tumour_prob=0.0)
    assert none.meta["tumour"] == 0 and not np.isin(none.label, [14, 15, 16, 18]).any()
    # a card may set the tumours' mean HU (cyst-like lesions): same seed, same geometry, the lesion 40 HU darker
    # (45 -> 5; less after the partial-volume blur at its rim), the rest of the image as before
    cyst = _case(5, tumour_prob=1.0, tumour_sites=("liver",), tumour_radius=(18.0, 22.0), tumour_hu=5.0)
    assert np.array_equal(cyst.label, case.label)
    assert 25.0 < case.image[t].mean() - cyst.image[t].mean() < 45.0
    far = (case.label == phantom.LABEL_ID["spleen"])
    assert np.array_equal(cyst.image[far], case.image[far])


def test_spacing_is_anisotropic_within_the_scaled_ranges():
    for seed in range(2):
        case = _case(seed, spacing_scale=4.0, inplane_spacing=(0.6, 1.0), slice_spacing=(1.5, 3.0))
        sx, sy, sz = case.spacing
        assert sx == pytest.approx(sy) and 2.4 - 1e-6 <= sx <= 4.0 + 1e-6 and 6.0 - 1e-6 <= sz <= 12.0 + 1e-6
        assert max(case.image.shape) <= 160
        # LPS storage: x and y voxel axes point to -x and -y of RAS
        assert case.affine[0, 0] < 0 and case.affine[1, 1] < 0 and case.affine[2, 2] > 0


def test_remap_labels_keeps_only_the_cards_classes():
    full = np.array([0, 6, 1, 2, 3, 8, 11], np.uint8)
    out = phantom.remap_labels(full, {"0": "background", "1": "liver", "2": "aorta"})
    assert out.tolist() == [0, 1, 0, 0, 0, 2, 0]


@pytest.mark.parametrize("card_id", PHANTOM_CARDS)
def test_shipped_phantom_cards_validate_and_name_phantom_classes(card_id):
    card = load_card(card_id)
    assert card["source"]["kind"] == "synthetic" and card["expected_count"] == card["source"]["synthetic"]["n_cases"]
    if card["task"] == "segmentation":
        assert all(n in phantom.LABEL_ID for n in card["labels"].values())
    for name, target in card["vocomni_map"].items():
        assert name in card["labels"].values() and phantom.VOCOMNI_NAME[name] == target


def _cards_override(tmp_path: Path, edits: dict[str, dict]) -> Path:
    """Copy phantom cards into tmp with source.synthetic edits; return a config override pointing at them."""
    cards = tmp_path / "cards"
    cards.mkdir(exist_ok=True)
    for cid, syn in edits.items():
        doc = yaml.safe_load((REPO / "config" / "datasets" / f"{cid}.yaml").read_text())
        doc["source"]["synthetic"].update(syn)
        doc["expected_count"] = doc["source"]["synthetic"]["n_cases"]
        (cards / f"{cid}.yaml").write_text(yaml.safe_dump(doc))
    ov = tmp_path / "override.yaml"
    ov.write_text(yaml.safe_dump({"cards_dir": str(cards)}))
    return ov


@pytest.mark.slow
def test_synth_writes_msd_layout_deterministically(tmp_path):
    ov = _cards_override(tmp_path, {"phantom_organs": {"n_cases": 3, "n_test": 1}})
    out = tmp_path / "raw"
    assert main(["synth", "--dataset", "phantom_organs", "--out", str(out), "--override", str(ov)]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["voco_dataset"] == "phantom_organs" and doc["region"] == "abdomen" and doc["modality"] == {"0": "CT"}
    assert doc["labels"]["0"] == "background" and doc["labels"]["5"] == "liver"
    assert doc["labels_full"]["6"] == "liver" and len(doc["training"]) == 2 and len(doc["test"]) == 1
    e = doc["training"][0]
    img, lab, full = (nib.load(out / e[k]) for k in ("image", "label", "label_full"))
    assert img.shape == lab.shape == full.shape and np.allclose(img.affine, lab.affine)
    lab_a, full_a = np.asarray(lab.dataobj), np.asarray(full.dataobj)
    assert set(np.unique(lab_a)) <= {int(k) for k in doc["labels"]}
    # the partial label is the full truth restricted to the card's classes
    assert np.array_equal(lab_a == 5, full_a == phantom.LABEL_ID["liver"])
    assert not (lab_a[full_a == phantom.LABEL_ID["spine"]]).any()
    t = doc["test"][0]
    assert t["image"].startswith("./imagesTs/") and (out / t["label"]).is_file()
    # SOURCE.json last, with checksums of every file; a second run is byte-identical
    src = json.loads((out / "SOURCE.json").read_text())
    assert src["kind"] == "synthetic" and src["files"]["dataset.json"] == sha256_file(out / "dataset.json")
    assert all(sha256_file(out / f) == h for f, h in src["files"].items())
    before = (out / "SOURCE.json").read_bytes()
    assert main(["synth", "--dataset", "phantom_organs", "--out", str(out), "--override", str(ov)]) == 0
    assert (out / "SOURCE.json").read_bytes() == before


def test_synth_classification_card_writes_balanced_classes(tmp_path):
    ov = _cards_override(tmp_path, {"phantom_cls": {"n_cases": 4, "n_test": 1, "inplane_spacing": [1.0, 1.2]}})
    out = tmp_path / "cls"
    assert main(["synth", "--dataset", "phantom_cls", "--out", str(out), "--override", str(ov)]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["task"] == "classification" and doc["labels"] == {"0": "no_tumour", "1": "tumour"}
    classes = [e["class"] for e in doc["training"] + doc["test"]]
    assert classes == [0, 1, 0, 1]
    assert all("label" not in e and "label_full" in e for e in doc["training"])
    for e, c in zip(doc["training"], classes, strict=False):
        full = np.asarray(nib.load(out / e["label_full"]).dataobj)
        assert bool(np.isin(full, [14, 16]).any()) == bool(c)
