# Shared helpers for the rule files (dataset cards, paths, shards). Keep it small; logic belongs in src/voco.
from pathlib import Path

import yaml

DATA = config["paths"]["data"]
RUNS = config["paths"]["runs"]
RESULTS = config["paths"]["results"]
LOGS = config["paths"]["logs"]
SHARDS = config["preprocess"]["shards"]
CONDA_ENV = "../envs/voco.yaml"
CONTAINER = "containers/voco.sif"
VOCO = "voco"  # the CLI; every rule is a thin call of one subcommand

# Final outputs of the whole DAG; each rule file appends its own (rule all takes them).
ALL_TARGETS = []


REPO = Path(workflow.basedir).parent
CARDS_DIR = Path(config["cards_dir"]) if Path(config["cards_dir"]).is_absolute() else REPO / config["cards_dir"]


def _write_resolved_config():
    """The validated config (overrides merged, defaults filled) as one file that every `voco` call reads.

    Rewritten only when its content changes, so job commands stay stable (no spurious re-runs)."""
    text = yaml.safe_dump(dict(config), sort_keys=True)
    path = Path(".snakemake", "voco", "config.yaml")
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)


# Rules pass it to the CLI as `params: config=VOCO_CONFIG` + `--config {params.config}`, so that
# `snakemake --configfile` overrides reach every `voco` call.
VOCO_CONFIG = _write_resolved_config()


def card(dataset):
    """The dataset card <cards_dir>/<dataset>.yaml (validated by the CLI when it is used)."""
    return yaml.safe_load(Path(CARDS_DIR, f"{dataset}.yaml").read_text())


PRETRAIN = list(config["datasets"]["pretrain"])
DOWNSTREAM = list(config["datasets"]["downstream"])
ALL_DATASETS = list(dict.fromkeys(PRETRAIN + DOWNSTREAM))
CARDS = {d: card(d) for d in ALL_DATASETS}


def source_kind(dataset):
    return CARDS[dataset]["source"]["kind"]


def raw_dir(wildcards):
    return f"{DATA}/raw/{wildcards.dataset}"


def ids_of_kind(*kinds):
    """Regex alternation of the dataset ids whose card source kind is one of ``kinds`` (wildcard constraint)."""
    ids = [d for d in ALL_DATASETS if source_kind(d) in kinds]
    return "|".join(ids) if ids else "(?!x)x"  # never matches when empty


def card_format(dataset):
    return CARDS[dataset].get("format", "msd")


def shards_for(dataset):
    """Shards of one dataset: preprocess.shards at most, about preprocess.cases_per_shard cases each (from the
    card's expected_count; no count -> preprocess.shards). Small datasets get few jobs, 160K-case corpora many."""
    n = CARDS[dataset].get("expected_count")
    per = config["preprocess"]["cases_per_shard"]
    if not n:
        return SHARDS
    return max(1, min(SHARDS, -(-int(n) // per)))


def shard_manifests(dataset):
    return [f"{DATA}/prep/{dataset}/shard-{k}/manifest.parquet" for k in range(shards_for(dataset))]


def prep_manifest(dataset):
    return f"{DATA}/prep/{dataset}/manifest.parquet"

