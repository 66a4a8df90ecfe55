"""The config schema: defaults filled, unknown / bad keys named, every shipped config and card valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from voco.config import deep_merge, load_card, load_config, region_params
from voco.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_config_is_valid_and_filled():
    cfg = load_config()
    assert cfg["preprocess"]["shards"] >= 1
    assert set(cfg["preprocess"]["regions"]) >= {"abdomen", "chest"}
    assert cfg["paths"]["data"] == "data"


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"preprocess": {"shardz": 3}}))
    with pytest.raises(ConfigError, match=r"preprocess\.shardz"):
        load_config(overrides=[bad])


def test_bad_value_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"preprocess": {"shards": 0}}))
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[bad])
    assert "preprocess.shards" in str(e.value) and "bad.yaml" in str(e.value)


def test_bad_dataset_id_pattern(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": {"pretrain": ["Bad-Id"]}}))
    with pytest.raises(ConfigError, match="datasets.pretrain.0"):
        load_config(overrides=[bad])


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": [1]}}
    out = deep_merge(base, {"a": {"b": 2}})
    assert out == {"a": {"b": 2, "c": [1]}} and base["a"]["b"] == 1


@pytest.mark.parametrize("override", sorted((REPO / "config" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_override_validates(override):
    load_config(overrides=[override])


def test_every_card_validates_and_configured_datasets_have_cards():
    cards = sorted((REPO / "config" / "datasets").glob("*.yaml"))
    assert cards, "no dataset cards shipped"
    for p in cards:
        card = load_card(p.stem)
        assert card["id"] == p.stem
    cfg = load_config()
    for d in cfg["datasets"]["pretrain"] + cfg["datasets"]["downstream"]:
        params = region_params(cfg, load_card(d))
        assert len(params["spacing"]) == 3 and params["window"][0] < params["window"][1]


def test_missing_card_lists_known(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_card("no_such_dataset")
