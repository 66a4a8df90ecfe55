"""VoComni curation: class mapping, ensemble fusion, label completion, scoring; the `voco vocomni` command."""

from __future__ import annotations

import numpy as np
import pytest
from test_resume_identity import _outputs  # run folders without TensorBoard events / tracking files

from voco.errors import ConfigError, DataError
from voco.omni.curation import (
    VOCOMNI_CLASSES,
    agreement,
    annotated_channels,
    complete_label,
    confidence,
    fuse,
    label_lut,
    map_label,
    per_class_dice,
)


def test_vocomni_has_21_channels():
    assert len(VOCOMNI_CLASSES) == 21 and VOCOMNI_CLASSES[0] == "background"
    assert len(set(VOCOMNI_CLASSES)) == 21


def test_label_lut_maps_by_card_and_by_name():
    labels = {"0": "background", "1": "Liver", "2": "kidney (R)", "3": "bone"}
    lut = label_lut(labels, {"kidney (R)": "kidney_right"})
    assert lut.tolist() == [0, VOCOMNI_CLASSES.index("liver"), VOCOMNI_CLASSES.index("kidney_right"), 0]
    lab = np.array([[[0, 1, 2, 3]]], dtype=np.uint8)
    assert map_label(lab, lut).tolist() == [[[0, 6, 2, 0]]]
    with pytest.raises(ConfigError, match="not a VoComni class"):
        label_lut(labels, {"Liver": "hepar"})
    with pytest.raises(DataError, match="label value 7"):
        map_label(np.array([7]), lut)


def test_annotated_channels():
    m = annotated_channels(["spleen", "kidney (R)"], {"kidney (R)": "kidney_right"})
    assert m[0] and m[1] and m[2] and m.sum() == 3


def _probs(pred: np.ndarray, c: int, p: float = 0.9) -> np.ndarray:
    out = np.full((c, *pred.shape), (1 - p) / (c - 1), dtype=np.float32)
    np.put_along_axis(out, pred[None].astype(np.int64), p, axis=0)
    return out


def test_fuse_averages_members():
    a = _probs(np.zeros((2, 2, 2), int), 3, 0.8)
    b = _probs(np.ones((2, 2, 2), int), 3, 0.6)
    f = fuse([a, b])
    assert np.allclose(f.sum(0), 1) and np.allclose(f[0], (0.8 + 0.2) / 2)
    with pytest.raises(ValueError):
        fuse([])


def test_complete_keeps_annotated_and_fills_the_rest():
    # 4 classes; the source annotates class 1 only. The ensemble predicts class 1 where the source says background
    # (must stay background: class 1 is known absent there), and class 2 / 3 elsewhere (must be filled).
    own = np.array([[[1, 1, 0, 0, 0, 0]]], dtype=np.uint8)
    ens = np.array([[[2, 0, 1, 2, 3, 0]]])
    probs = _probs(ens, 4)
    ann = np.array([True, True, False, False])
    out = complete_label(own, ann, probs)
    assert out.tolist() == [[[1, 1, 0, 2, 3, 0]]]
    # annotated voxels are exact whatever the ensemble says
    assert np.array_equal(out == 1, own == 1)


def test_confidence_and_agreement():
    pred = np.array([[[0, 1, 1, 2]]])
    probs = _probs(pred, 3, 0.7)
    conf, n = confidence(probs)
    assert n == 3 and conf == pytest.approx(0.7)
    assert confidence(_probs(np.zeros((2, 2, 2), int), 3))[0] == 0.0
    a = np.array([0, 1, 1, 2, 0])
    b = np.array([0, 1, 2, 2, 1])
    assert agreement([a, b]) == pytest.approx(2 / 4)
    assert agreement([a]) == 1.0 and agreement([a * 0, a * 0]) == 1.0


def test_per_class_dice():
    p = np.array([0, 1, 1, 2, 2, 0])
    g = np.array([0, 1, 0, 2, 2, 2])
    d = per_class_dice(p, g, 4)
    assert d[1] == pytest.approx(2 / 3) and d[2] == pytest.approx(4 / 5) and np.isnan(d[3])


# ------------------------------------------------------------------------------------- tiny stores for integration
FULL = {0: "background", 1: "spleen", 2: "kidney_right", 6: "liver"}
BOXES = {6: (slice(2, 11), slice(3, 14), slice(4, 18)), 1: (slice(14, 21), slice(4, 12), slice(6, 16)),
         2: (slice(12, 20), slice(15, 21), slice(3, 12))}
HU = {0: 0.15, 6: 0.5, 1: 0.72, 2: 0.92}


def phantom_volume(seed: int, shape=(24, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    """A tiny phantom: liver / spleen / kidney boxes at consistent places (shifted per case), distinct intensities."""
    rng = np.random.default_rng(seed)
    sx, sy = rng.integers(-1, 2, size=2)
    full = np.zeros(shape, np.uint8)
    for value, box in BOXES.items():
        b = (slice(box[0].start + sx, box[0].stop + sx), slice(box[1].start + sy, box[1].stop + sy), box[2])
        full[b] = value
    img = np.vectorize(HU.get)(full).astype(np.float32) + rng.normal(0, 0.03, shape).astype(np.float32)
    return np.clip(img, 0, 1), full


def make_store(root, dataset: str, labels: dict[int, str], n: int, seed: int = 0, labelled: bool = True):
    """A store (manifest + cases) of ``n`` tiny phantoms whose label holds only ``labels`` (partial, own values)."""
    from voco.data.store import write_case, write_manifest

    name_to_full = {v: k for k, v in FULL.items()}
    rows = []
    for i in range(n):
        img, full = phantom_volume(seed * 1000 + i)
        labs = {"label_full": full}
        if labelled:
            lab = np.zeros_like(full)
            for value, name in labels.items():
                if value:
                    lab[full == name_to_full[name]] = value
            labs["label"] = lab
        cid = f"{dataset}_{i:03d}"
        meta = {"shape": list(full.shape), "spacing": [4.0, 4.0, 4.0], "labels": {str(k): v for k, v in labels.items()},
                "labels_full": {str(k): v for k, v in FULL.items()}, "dataset": dataset, "region": "abdomen"}
        rel = write_case(root, cid, img[None], labs, None, meta)
        rows.append({"case_id": cid, "dataset": dataset, "region": "abdomen", "status": "ok", "reason": "",
                     "shape": list(full.shape), "spacing": [4.0, 4.0, 4.0], "split": "train", "labelled": labelled,
                     "class": -1, "key": f"k{i}", "index": i, "n_channels": 1, **rel})
    write_manifest(rows, root / "manifest.parquet")
    return root


def write_card(cards, dataset: str, labels: dict[int, str], roles, vocomni_map=None) -> None:
    import yaml

    card = {"id": dataset, "region": "abdomen", "role": list(roles), "source": {"kind": "synthetic"},
            "labels": {str(k): v for k, v in labels.items()}}
    if vocomni_map is not None:
        card["vocomni_map"] = vocomni_map
    (cards / f"{dataset}.yaml").write_text(yaml.safe_dump(card))


SRC_A = {0: "background", 1: "liver", 2: "spleen"}
SRC_B = {0: "background", 1: "kidney_right", 2: "liver"}


@pytest.fixture(scope="module")
def omni_env(tmp_path_factory):
    """Two partially labelled sources + one unlabelled pool, their cards, and a tiny-run config override."""
    import yaml

    root = tmp_path_factory.mktemp("omni")
    cards = root / "cards"
    cards.mkdir()
    write_card(cards, "tiny_src_a", SRC_A, ["pretrain", "vocomni"], {"liver": "liver", "spleen": "spleen"})
    write_card(cards, "tiny_src_b", SRC_B, ["pretrain", "vocomni"], {"kidney_right": "kidney_right", "liver": "liver"})
    write_card(cards, "tiny_pool", {0: "background"}, ["pretrain", "unlabelled"])
    make_store(root / "prep" / "tiny_src_a", "tiny_src_a", SRC_A, 4, seed=1)
    make_store(root / "prep" / "tiny_src_b", "tiny_src_b", SRC_B, 4, seed=2)
    make_store(root / "prep" / "tiny_pool", "tiny_pool", {0: "background"}, 3, seed=3, labelled=False)
    override = {
        "cards_dir": str(cards),
        "paths": {"data": str(root / "data"), "runs": str(root / "runs"), "results": str(root / "results"),
                  "logs": str(root / "logs")},
        "datasets": {"pretrain": ["tiny_src_a", "tiny_src_b", "tiny_pool"], "downstream": []},
        "preprocess": {"roi": [16, 16, 16]},
        "vocomni": {"members": [{"model": "cnn_small", "seed": 0, "feature_size": 4},
                                {"model": "cnn_small", "seed": 1, "feature_size": 4}],
                    "steps": 40, "lr": 0.03, "min_confidence": 0.5, "min_agreement": 0.3},
    }
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    return root


@pytest.mark.slow
def test_vocomni_command_completes_partial_labels(omni_env):
    import json

    import pandas as pd

    from voco.cli import main
    from voco.data.store import Store

    root = omni_env
    prep = root / "prep"
    args = ["vocomni", "--prep", str(prep / "tiny_src_a"), str(prep / "tiny_src_b"), "--out", str(root / "vocomni"),
            "--override", str(root / "override.yaml")]
    assert main(args) == 0
    report = json.loads((root / "results" / "omni" / "curation.json").read_text())
    d = report["dice"]
    # source A lacks the kidney, source B the spleen: the ensemble fills them; the source labels alone score 0
    assert d["partial_filled_mean"] == 0.0
    assert d["completed_filled_mean"] > 0.6, d
    assert d["completed_given_mean"] == pytest.approx(1.0)
    assert set(d["completed_filled_per_class"]) == {"kidney_right", "spleen"}
    assert report["volumes"] == 8 and len(report["members"]) == 2
    # the output is a store: stage 1 reads it; annotated classes are kept exactly
    store = Store(root / "vocomni")
    assert len(store.ids()) == report["kept"] > 0
    src = Store(prep / "tiny_src_a")
    for cid in store.ids():
        case = store.load(cid)
        assert case.image.shape == case.label.shape == (24, 24, 24)
        if cid.startswith("tiny_src_a__"):
            own = src.load(cid.split("__", 1)[1]).label
            liver = VOCOMNI_CLASSES.index("liver")
            assert np.array_equal(case.label == liver, own == 1)
            assert case.meta["vocomni"]["filled"] == ["kidney_right"]
    table = pd.read_parquet(root / "vocomni" / "curation.parquet")
    assert len(table) == 8 and {"confidence", "agreement", "kept", "dice_filled"} <= set(table.columns)
    assert (root / "vocomni" / "curation.png").stat().st_size > 1000

    # the job's outputs are complete: each member folder holds its declared outputs only (no last.pt)
    for k in (0, 1):
        assert _outputs(root / "runs" / "vocomni" / f"member-{k}") == [
            "final.pt", "metrics.jsonl", "progress.png"]
    curves = [(root / "runs" / "vocomni" / f"member-{k}" / "metrics.jsonl").read_bytes() for k in (0, 1)]

    # stricter thresholds: same members (resumed, not retrained), every volume dropped and listed
    strict = root / "strict.yaml"
    strict.write_text("vocomni:\n  min_confidence: 1.0\n")
    args2 = args[:4] + ["--out", str(root / "vocomni_strict"), "--override", str(root / "override.yaml"),
                        "--override", str(strict), "--report", str(root / "strict.json")]
    assert main(args2) == 0
    rep2 = json.loads((root / "strict.json").read_text())
    assert rep2["kept"] == 0 and len(rep2["dropped_cases"]) == 8
    # the members were reused, not trained again: no step ran (wall 0), their curves are untouched
    assert [(m["steps"], m["wall_s"]) for m in rep2["members"]] == [(40, 0.0), (40, 0.0)]
    assert [(root / "runs" / "vocomni" / f"member-{k}" / "metrics.jsonl").read_bytes() for k in (0, 1)] == curves
    assert Store(root / "vocomni_strict").ids() == []


def test_fuse_moves_unlearnable_classes_to_background():
    p = _probs(np.full((2, 2, 2), 2), 3, 0.8)
    f = fuse([p], np.array([True, True, False]))
    assert np.allclose(f[2], 0) and np.allclose(f.sum(0), 1) and (f.argmax(0) == 0).all()


@pytest.mark.slow
def test_vocomni_members_resume_after_an_interrupted_attempt(omni_env, tmp_path, caplog):
    """SIGTERM while member 1 trains: the job exits 75; Snakemake then removes the failed job's outputs (the members'
    final.pt and curves). The retry resumes every member from the last.pt that survived: member 0 trains no step
    again, member 1 continues after the step it stopped at."""
    import json

    import torch
    from test_resume_identity import _sigterm_after

    from voco.cli import main

    root = omni_env
    work, out = tmp_path / "work", tmp_path / "vocomni"
    args = ["vocomni", "--prep", str(root / "prep" / "tiny_src_a"), str(root / "prep" / "tiny_src_b"), "--out", str(out),
            "--work", str(work), "--report", str(tmp_path / "curation.json"), "--override", str(root / "override.yaml")]
    m0, m1 = work / "member-0", work / "member-1"
    t = _sigterm_after(m1 / "metrics.jsonl", 5)
    assert main(args) == 75
    t.join()
    assert torch.load(m0 / "last.pt", weights_only=True)["step"] == 40  # kept until the job's outputs exist
    stopped = torch.load(m1 / "last.pt", weights_only=True)["step"]
    assert 5 <= stopped < 40 and not (m1 / "final.pt").exists()
    curve0 = (m0 / "metrics.jsonl").read_text()
    for member in (m0, m1):  # a failed job's declared outputs go
        for name in ("final.pt", "metrics.jsonl", "progress.png"):
            (member / name).unlink(missing_ok=True)

    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert f"resuming from {m1 / 'last.pt'} at step {stopped}" in caplog.text
    report = json.loads((tmp_path / "curation.json").read_text())
    assert [m["steps"] for m in report["members"]] == [40, 40]
    assert report["members"][0]["wall_s"] == 0.0  # member 0: nothing trained again
    assert [json.loads(x) for x in (m0 / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(x) for x in curve0.splitlines()]  # its curve restored from the checkpoint
    steps1 = [json.loads(x)["step"] for x in (m1 / "metrics.jsonl").read_text().splitlines()]
    assert steps1 == list(range(1, 41))  # member 1: the first `stopped` steps restored, the rest trained now
    for member in (m0, m1):
        assert _outputs(member) == ["final.pt", "metrics.jsonl", "progress.png"]
