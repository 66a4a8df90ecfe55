"""Every shipped dataset card validates, and the paper's cards carry what the pipeline needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from voco.config import load_card, load_config, region_params, repo_root
from voco.omni import curation

CARDS = sorted((repo_root() / "config" / "datasets").glob("*.yaml"))
REAL = [p for p in CARDS if not p.stem.startswith("phantom")]
REQUIRED_DOWNSTREAM = {
    "btcv",
    "amos22",
    "word",
    "flare22",
    "totalsegmentator",
    "mm_whs",
    "brats21",
    "cc_ccii",
    "kits",
    "covid19_20",
    *(
        f"msd_task{n:02d}_{t}"
        for n, t in enumerate(
            [
                "braintumour",
                "heart",
                "liver",
                "hippocampus",
                "prostate",
                "lung",
                "pancreas",
                "hepaticvessel",
                "spleen",
                "colon",
            ],
            start=1,
        )
    ),
}
# SPEC 3's 21 VoComni channels: config.yaml vocomni.classes, else the package's own list
VOCOMNI_CLASSES = load_config().get("vocomni", {}).get("classes") or list(curation.VOCOMNI_CLASSES)


@pytest.mark.parametrize("path", CARDS, ids=[p.stem for p in CARDS])
def test_every_card_validates(path: Path):
    card = load_card(path.stem)
    assert card["id"] == path.stem


def test_paper_config_lists_existing_cards(paper_cfg: dict):
    ids = {p.stem for p in CARDS}
    listed = set(paper_cfg["datasets"]["pretrain"]) | set(paper_cfg["datasets"]["downstream"])
    assert listed <= ids, listed - ids
    assert paper_cfg["model"]["name"] == "swinunetr" and paper_cfg["preprocess"]["shards"] >= 64


def test_paper_cards_present():
    ids = {p.stem for p in REAL}
    assert REQUIRED_DOWNSTREAM <= ids, REQUIRED_DOWNSTREAM - ids
    assert "vocomni" in ids
    prect = sorted(i for i in ids if i.startswith("prect_"))
    assert len(prect) == 23  # the rows of the paper's Table 1


@pytest.fixture(scope="module")
def paper_cfg() -> dict:
    return load_config(overrides=[repo_root() / "config" / "experiments" / "paper.yaml"])


@pytest.mark.parametrize("path", REAL, ids=[p.stem for p in REAL])
def test_real_card_contents(path: Path, paper_cfg: dict):
    card = load_card(path.stem)
    cfg = paper_cfg
    params = region_params(cfg, card)
    assert len(params["spacing"]) == 3 and len(params["window"]) == 2 and params["window"][0] < params["window"][1]
    src = card["source"]
    assert src["kind"] in ("http", "huggingface", "manual", "local")
    if src["kind"] == "http":
        assert src.get("sha256") or src.get("md5") or src.get("checksum_note"), "http source without any checksum"
    if src["kind"] == "huggingface":
        assert src.get("repo") and (src.get("files") or src.get("include"))
    if src["kind"] == "manual":
        assert len(src.get("instructions", "")) > 40
    assert card.get("expected_count", 0) > 0
    if card["task"] == "segmentation":
        labels = card["labels"]
        assert labels["0"] == "background" and all(k.isdigit() for k in labels)
        assert len(set(labels.values())) == len(labels), "duplicate class names"
        for own, omni in card.get("vocomni_map", {}).items():
            assert own in labels.values() and omni in VOCOMNI_CLASSES[1:], (own, omni)
    if "downstream" in card["role"]:
        assert card["split"] and "roi" in card["finetune"] and "epochs" in card["finetune"]
    if path.stem.startswith("prect_"):
        assert card["role"] == ["pretrain", "unlabelled"] and card["source"]["repo"] == "Luffy503/PreCT-160K"


def test_vocomni_card_has_21_channels():
    card = load_card("vocomni")
    assert len(VOCOMNI_CLASSES) == 21
    assert [card["labels"][str(i)] for i in range(21)] == VOCOMNI_CLASSES
    assert "vocomni" in card["role"] and card["source"]["repo"] == "Luffy503/VoComni"


def test_reference_task_settings():
    """Spot checks against the reference per-task settings (SPEC 6)."""
    btcv = load_card("btcv")
    assert btcv["preprocess"] == {"spacing": [1.5, 1.5, 1.5], "window": [-175, 250], "roi": [96, 96, 96]}
    assert load_card("msd_task06_lung")["preprocess"]["spacing"] == [1.25, 1.25, 5.0]
    assert load_card("totalsegmentator")["preprocess"]["window"] == [-1000, 1000]
    assert len(load_card("totalsegmentator")["labels"]) == 105
    assert load_card("msd_task01_braintumour")["modality"] == {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}
    assert load_card("brats21")["labels"]["4"] == "enhancing_tumour"
    assert load_card("cc_ccii")["task"] == "classification"
