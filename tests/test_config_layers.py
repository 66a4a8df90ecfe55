"""Configuration layers: the paper resolves to the paper, precedence is one rule, cards mean what they say, slices.

Every test uses the shipped config, experiment files and cards unmodified; where a case needs a different value it is
given the way a user gives it (an override file in tmp_path, a --set flag, a cards folder of one's own).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from voco import settings, settings_codegen
from voco.config import (
    RULE_SECTIONS,
    Config,
    build,
    load_card,
    load_config,
    region_params,
    resolve,
    resolve_workflow,
    write_slice,
)
from voco.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "experiments" / "paper.yaml"
BASE = REPO / "config" / "config.yaml"
VOCO = [sys.executable, "-m", "voco.cli"]


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def paper() -> Config:
    return resolve(overrides=[PAPER])


# ------------------------------------------------------------------------------------------------ the paper
PAPER_VALUES = {
    "experiment": "paper",
    "model.name": "swinunetr",
    "model.size": "B",
    "model.use_checkpoint": True,
    "pretrain.voco.roi": 64,
    "pretrain.voco.grid": 3,
    "pretrain.voco.sw": 2,
    "pretrain.omni.sw": 4,
    "pretrain.voco.augment": {"flip_p": 0.2, "rot90_p": 0.2, "shift": 0.1, "shift_p": 0.5},
    "pretrain.voco.feature_dropout": "row",
    "pretrain.voco.feature_dropout_p": 0.2,
    "pretrain.lr": 1e-4,
    "pretrain.amsgrad": True,
    "pretrain.weight_decay": 0.01,
    "pretrain.warmup": 5000,
    "pretrain.steps": 100000,
    "pretrain.batch_size": 4,
    "pretrain.omni.stage1_steps": 50000,
    "pretrain.omni.stage2_steps": 50000,
    "pretrain.suprem.steps": 40000,
    "vocomni.steps": 20000,
    "finetune.steps": 25000,
    "finetune.lr": 3e-4,
    "finetune.roi": [96, 96, 96],
    "finetune.samples_per_volume": 4,
    "finetune.pos_neg": [9, 1],
    "finetune.seeds": [0, 1, 2],
    "evaluate.overlap": 0.75,
    "evaluate.extra_overlaps": [0.5],
    "evaluate.nsd_tolerance_mm": 1.0,
    "evaluate.original_space": True,
    "preprocess.roi": [96, 96, 96],
    "preprocess.regions.abdomen.spacing": [1.5, 1.5, 1.5],
    "preprocess.regions.abdomen.window": [-175, 250],
    "preprocess.regions.chest.spacing": [1.25, 1.25, 5.0],
    "preprocess.regions.chest.window": [-1000, 500],
}


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("key", sorted(PAPER_VALUES))
def test_paper_file_resolves_to_the_paper(paper, key):
    assert _get(paper, key) == PAPER_VALUES[key]


def test_paper_loader_workers_and_datasets(paper):
    assert paper["pretrain"]["num_workers"] in ("auto",) or int(paper["pretrain"]["num_workers"]) > 0
    assert "btcv" in paper["datasets"]["downstream"] and "prect_nlst" in paper["datasets"]["pretrain"]


def test_voco_config_prints_the_paper():
    """The command a user types prints the paper's values (not the laptop's)."""
    r = subprocess.run([*VOCO, "config", "--override", str(PAPER)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    body = yaml.safe_load("\n".join(line for line in r.stdout.splitlines() if not line.startswith("#")))
    for key, value in PAPER_VALUES.items():
        assert _get(body, key) == value, key
    assert "experiment paper" in r.stdout


def test_no_laptop_value_leaks_into_the_paper(paper):
    """Every key the laptop base sets resolves, in the paper, to the schema default (base: schema drops the base)."""
    laptop = yaml.safe_load(BASE.read_text())
    defaults = build([])  # the schema defaults alone
    leaks = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*path, k])
        elif path and path[0] not in ("datasets", "experiment"):
            if _get(paper, ".".join(path)) != _get(defaults, ".".join(path)):
                leaks.append(".".join(path))

    walk(laptop, [])
    assert not leaks, f"laptop values in the paper: {leaks}"
    # and the laptop really differs from the paper where it matters (the test above would pass on equal files)
    lap = load_config()
    assert lap["model"]["name"] == "cnn_small" and lap["pretrain"]["voco"]["roi"] != 64


def test_settings_module_matches_the_schema():
    generated = settings_codegen.generate(REPO / "config" / "schemas" / "config.schema.yaml")
    assert (REPO / "src" / "voco" / "settings.py").read_text() == generated, (
        "src/voco/settings.py is stale: python -m voco.settings_codegen > src/voco/settings.py")


def test_typed_view_and_dict_view_agree(paper):
    assert paper.finetune.roi == paper["finetune"]["roi"]
    assert isinstance(paper.pretrain.voco, settings.PretrainVoco)
    assert paper.settings.evaluate.overlap == 0.75


# ------------------------------------------------------------------------------------------------ precedence
def test_precedence_experiment_card_override_flag(tmp_path):
    """defaults < base < experiment < card < user override < flag, for one key (finetune.roi of btcv)."""
    exp = _write(tmp_path / "exp.yaml", {"experiment": "mine", "finetune": {"roi": [64, 64, 64], "lr": 1e-3}})
    user = _write(tmp_path / "user.yaml", {"finetune": {"lr": 2e-3}})
    card = load_card("btcv")  # shipped card: finetune.roi [96, 96, 96], epochs 1000
    cfg = resolve(overrides=[user, exp])  # order on the command line does not matter: kinds do
    assert cfg["experiment"] == "laptop+mine"
    assert cfg["finetune"]["roi"] == [64, 64, 64] and cfg["finetune"]["lr"] == 2e-3
    ds = cfg.for_dataset(card)
    assert ds["finetune"]["roi"] == [96, 96, 96]  # the card beats the experiment
    assert ds["finetune"]["lr"] == 2e-3  # the user beats everything below
    assert ds["finetune"]["epochs"] == 1000
    user2 = _write(tmp_path / "user2.yaml", {"finetune": {"roi": [32, 32, 32], "steps": 7}})
    ds2 = resolve(overrides=[exp, user2]).for_dataset(card)
    assert ds2["finetune"]["roi"] == [32, 32, 32]  # user override beats the card
    assert ds2["finetune"]["steps"] == 7 and ds2["finetune"]["epochs"] is None  # user steps beat card epochs
    ds3 = resolve(overrides=[exp, user2], sets=["finetune.roi=[48,48,48]"]).for_dataset(card)
    assert ds3["finetune"]["roi"] == [48, 48, 48]  # the flag beats the override file


def test_region_params_follow_the_same_rule(tmp_path):
    card = load_card("msd_task09_spleen")
    cfg = resolve(overrides=[PAPER])
    assert region_params(cfg, card)["spacing"] == [1.5, 1.5, 1.5]
    user = _write(tmp_path / "u.yaml", {"preprocess": {"regions": {"abdomen": {"spacing": [2.0, 2.0, 2.0],
                                                                                "window": [-100, 200]}}}})
    p = region_params(resolve(overrides=[PAPER, user]), card)
    assert p["spacing"] == [2.0, 2.0, 2.0] and p["window"] == [-100, 200]  # user override beats the card


def test_base_schema_drops_the_base_and_names_layers(paper):
    assert [layer.kind for layer in paper.layers] == ["experiment"]
    lap = resolve()
    assert [layer.kind for layer in lap.layers] == ["base"]


def test_errors_name_the_file_that_set_the_key(tmp_path):
    exp = _write(tmp_path / "exp.yaml", {"experiment": "x", "finetune": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown key finetune\.stepz"):
        resolve(overrides=[exp])
    bad = _write(tmp_path / "bad.yaml", {"evaluate": {"overlap": 1.5}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: key evaluate\.overlap"):
        resolve(overrides=[PAPER, bad])
    with pytest.raises(ConfigError, match="experiment"):
        resolve(overrides=[_write(tmp_path / "e.yaml", {"experiment": ""})])
    with pytest.raises(ConfigError, match="base"):
        resolve(overrides=[_write(tmp_path / "b.yaml", {"base": "schema"})])


def test_set_flags_parse_yaml_values():
    cfg = resolve(sets=["finetune.steps=5", "finetune.roi=[16, 16, 16]", "model.feature_size=null"])
    assert cfg["finetune"]["steps"] == 5 and cfg["finetune"]["roi"] == [16, 16, 16]
    assert cfg["model"]["feature_size"] is None
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        resolve(sets=["finetune.steps"])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string, and validation rejected ``lr: 1e-4`` / ``--set finetune.lr=3e-3``."""
    user = tmp_path / "user.yaml"
    user.write_text("finetune:\n  lr: 1e-4\n  weight_decay: 5E-5\npretrain:\n  lr: 2.5e-4\n")
    cfg = resolve(overrides=[user], sets=["pretrain.voco.momentum=9e-1"])
    assert cfg["finetune"]["lr"] == 1e-4 and cfg["finetune"]["weight_decay"] == 5e-5
    assert cfg["pretrain"]["lr"] == 2.5e-4 and cfg["pretrain"]["voco"]["momentum"] == 0.9
    assert resolve(sets=["finetune.lr=3e-3"])["finetune"]["lr"] == 3e-3
    assert resolve(sets=['paths.runs="1e3"'])["paths"]["runs"] == "1e3"  # quoted: still a string


def test_snakemake_config_flags_keep_their_types():
    """Snakemake's own --config parser (dotted keys are refused there) reads nested values with YAML's base loader:
    every one a string. The workflow's flag layer reads them back as --set does."""
    from snakemake.cli import parse_config

    flags = parse_config(["finetune={steps: 7, lr: 3e-3, grad_clip: null, seeds: [0, 1]}",
                          "evaluate={original_space: false}", "pretrain={run: laptop2}"])
    assert flags["finetune"]["steps"] == "7"  # what Snakemake hands over
    cfg = resolve_workflow(REPO / "config" / "config.yaml", [], flags)
    assert cfg["finetune"]["steps"] == 7 and cfg["finetune"]["lr"] == 3e-3 and cfg["finetune"]["grad_clip"] is None
    assert cfg["finetune"]["seeds"] == [0, 1] and cfg["evaluate"]["original_space"] is False
    assert cfg["pretrain"]["run"] == "laptop2" and cfg["finetune"]["weight_decay"] == 1e-5  # merged, not replaced


def test_card_with_misspelt_finetune_key_fails_naming_the_card(tmp_path):
    cards = tmp_path / "cards"
    cards.mkdir()
    doc = yaml.safe_load((REPO / "config" / "datasets" / "btcv.yaml").read_text())
    doc["finetune"]["epochz"] = 10
    _write(cards / "btcv.yaml", doc)
    with pytest.raises(ConfigError, match=r"btcv\.yaml: unknown key finetune\.epochz"):
        load_card("btcv", cards)


def test_every_shipped_card_passes_its_finetune_keys():
    for p in sorted((REPO / "config" / "datasets").glob("*.yaml")):
        card = load_card(p.stem)
        ds = resolve(overrides=[PAPER]).for_dataset(card)
        for k, v in (card.get("finetune") or {}).items():
            assert ds["finetune"][k] == v, (p.name, k)


# ------------------------------------------------------------------------------------------------ slices
def test_slices_are_content_addressed_and_written_once(tmp_path):
    cfg = resolve()
    a = write_slice(cfg, "finetune", "phantom_organs", tmp_path)
    assert write_slice(cfg, "finetune", "phantom_organs", tmp_path) == a
    mtime = a.stat().st_mtime_ns
    other = resolve(sets=["evaluate.overlap=0.6"])  # a section finetune does not read
    assert write_slice(other, "finetune", "phantom_organs", tmp_path) == a and a.stat().st_mtime_ns == mtime
    changed = write_slice(resolve(sets=["finetune.steps=7"]), "finetune", "phantom_organs", tmp_path)
    assert changed != a and a.is_file() and a.stat().st_mtime_ns == mtime
    sl = load_config(changed)
    assert sl.rule == "finetune" and sl.dataset == "phantom_organs" and sl["finetune"]["steps"] == 7
    with pytest.raises(ConfigError, match="not part of rule finetune"):
        sl["evaluate"]
    with pytest.raises(ConfigError, match="not part of rule finetune"):
        sl.get("pretrain")


def test_slice_of_a_card_resolved_rule_keeps_user_above_card(tmp_path):
    user = _write(tmp_path / "u.yaml", {"finetune": {"steps": 3}})
    cfg = resolve(overrides=[PAPER, user])
    path = write_slice(cfg, "finetune", "btcv", tmp_path)
    sl = load_config(path)
    assert sl["finetune"]["steps"] == 3 and sl["finetune"]["epochs"] is None
    assert sl["finetune"]["roi"] == [96, 96, 96]
    assert sl.for_dataset(load_card("btcv")) is sl  # already resolved for its dataset
    with pytest.raises(ConfigError, match="sets evaluate"):
        load_config(path, overrides=[_write(tmp_path / "x.yaml", {"evaluate": {"overlap": 0.5}})])


def test_card_edit_changes_only_the_slices_that_read_it(tmp_path):
    cards = tmp_path / "cards"
    cards.mkdir()
    for name in ("btcv",):
        (cards / f"{name}.yaml").write_text((REPO / "config" / "datasets" / f"{name}.yaml").read_text())
    user = _write(tmp_path / "u.yaml", {"cards_dir": str(cards)})
    cfg = resolve(overrides=[PAPER, user])
    before = {r: write_slice(cfg, r, "btcv", tmp_path / "s") for r in ("preprocess", "finetune", "evaluate")}
    doc = yaml.safe_load((cards / "btcv.yaml").read_text())
    doc["description"] = "edited description"
    _write(cards / "btcv.yaml", doc)
    after = {r: write_slice(cfg, r, "btcv", tmp_path / "s") for r in before}
    assert after == before  # a description is read by no rule
    doc["preprocess"]["spacing"] = [2.0, 2.0, 2.0]
    _write(cards / "btcv.yaml", doc)
    after = {r: write_slice(cfg, r, "btcv", tmp_path / "s") for r in before}
    assert after["preprocess"] != before["preprocess"] and after["evaluate"] == before["evaluate"]


def test_every_rule_of_the_workflow_declares_its_sections():
    import re

    rules = set()
    for p in (REPO / "rules").glob("*.smk"):
        text = p.read_text()
        rules |= set(re.findall(r"cfg_for\(\"(\w+)\"\),", text))
    assert rules and rules <= set(RULE_SECTIONS), rules - set(RULE_SECTIONS)


def test_workflow_resolution_classifies_files(tmp_path):
    user = _write(tmp_path / "u.yaml", {"finetune": {"steps": 9}})
    cfg = resolve_workflow(BASE, [BASE, PAPER, user], {"evaluate.overlap": 0.6})
    assert [layer.kind for layer in cfg.layers] == ["experiment", "override", "flag"]
    assert cfg["model"]["name"] == "swinunetr" and cfg["finetune"]["steps"] == 9
    assert cfg["evaluate"]["overlap"] == 0.6
