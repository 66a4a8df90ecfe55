# Shared helpers for the rule files: dataset cards, paths, shards. Keep it small: logic belongs in src/voco.
import yaml
from pathlib import Path

DATA = config["paths"]["data"]
RUNS = config["paths"]["runs"]
RESULTS = config["paths"]["results"]
LOGS = config["paths"]["logs"]
SHARDS = config["preprocess"]["shards"]
CONDA_ENV = "../envs/voco.yaml"
CONTAINER = "containers/voco.sif"


def card(dataset):
    """The dataset card config/datasets/<dataset>.yaml (validated by the CLI when it is used)."""
    return yaml.safe_load(Path(config["cards_dir"], f"{dataset}.yaml").read_text())


PRETRAIN = list(config["datasets"]["pretrain"])
DOWNSTREAM = list(config["datasets"]["downstream"])
ALL_DATASETS = list(dict.fromkeys(PRETRAIN + DOWNSTREAM))
CARDS = {d: card(d) for d in ALL_DATASETS}


def source_kind(dataset):
    return CARDS[dataset]["source"]["kind"]


def raw_dir(wildcards):
    return f"{DATA}/raw/{wildcards.dataset}"
