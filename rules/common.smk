# Shared helpers for the rule files (the resolved config, per-rule config files, dataset cards, paths, shards).
# Keep it small; logic belongs in src/voco (voco.config, voco.dag), where pytest and `voco check` reach it.
import sys
from snakemake.exceptions import WorkflowError
from pathlib import Path

REPO = Path(workflow.basedir).parent
sys.path.insert(0, str(REPO / "src"))  # pure-Python planning code: importable even where voco is not installed
from voco import config as voco_config
from voco import dag as voco_dag

# One resolution, by voco's layer rule: the Snakefile's configfile is the base layer, every --configfile (command line
# or profile) an experiment file (it says `experiment: <name>`) or a user override, --config key=value the flags.
VOCO_CFG = voco_config.resolve_workflow(
    REPO / "config" / "config.yaml",
    list(workflow.config_settings.configfiles or []),
    dict(workflow.config_settings.config or {}),
)
config.clear()
config.update(VOCO_CFG.to_dict())

DATA = config["paths"]["data"]
RUNS = config["paths"]["runs"]
RESULTS = config["paths"]["results"]
LOGS = config["paths"]["logs"]
CONDA_ENV = "../envs/voco.yaml"
CONTAINER = "containers/voco.sif"
VOCO = "voco"  # the CLI; every rule is a thin call of one subcommand
CONFIG_DIR = ".snakemake/voco/config"  # per-rule config files (content-addressed, written once)

# Final outputs of the whole DAG; each rule file appends its own (rule all takes them).
ALL_TARGETS = []

_SLICES = {}


def cfg_file(rule, dataset=None):
    """The config file of one job: only the sections `rule` reads (voco.config.RULE_SECTIONS), resolved for `dataset`'s
    card, named by the hash of its content and never rewritten. Rules pass it as `params: config=...`, so Snakemake
    re-runs exactly the jobs whose values changed, and a dry run never alters a file that a queued job reads."""
    key = (rule, dataset)
    if key not in _SLICES:
        _SLICES[key] = str(voco_config.write_slice(VOCO_CFG, rule, dataset, CONFIG_DIR))
    return _SLICES[key]


def cfg_for(rule):
    """`params: config=cfg_for("rule")`: the job's config file (per dataset when the rule has a dataset wildcard)."""
    return lambda wc: cfg_file(rule, getattr(wc, "dataset", None))


PRETRAIN, DOWNSTREAM, ALL_DATASETS = voco_dag.datasets(config)
CARDS = {d: voco_config.load_card(d, config["cards_dir"]) for d in ALL_DATASETS}


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


def card_file(dataset):
    """The dataset's card: an input of its per-dataset jobs (a changed card re-runs them)."""
    return CARDS[dataset]["_path"]


def shards_for(dataset):
    """Shards of one dataset (voco.dag.shards_for): used by every sharded rule (preprocess, pseudolabel)."""
    return voco_dag.shards_for(config, CARDS[dataset])


def shard_manifests(dataset):
    return [f"{DATA}/prep/{dataset}/shard-{k}/manifest.parquet" for k in range(shards_for(dataset))]


def prep_manifest(dataset):
    return f"{DATA}/prep/{dataset}/manifest.parquet"


def voco_check(log=None):
    """`onstart`: `voco check` of this run's resolved config, before any job starts (a broken plan fails in seconds).

    Only runs when there is work to do (not on dry runs, not inside cluster jobs, which Snakemake starts with
    --no-hooks). The same check, standalone: `voco check [--override FILE ...]`."""
    from voco.check import format_report, run_check

    found = run_check(VOCO_CFG)
    print(format_report(VOCO_CFG, found), file=sys.stderr)
    if not found.ok:
        raise WorkflowError(f"voco check: the plan has {len(found.errors)} error(s) (listed above); nothing was run")


AUDIT_ENFORCE = bool(config.get("audit", {}).get("enforce", True))


def leakage_gate(wildcards):
    """The leakage verdict a fine-tuning job waits for (audit.enforce): its dataset's audit, for every init that comes
    from pre-training. Such an init already depends on the pre-training corpus (through its checkpoint), so the gate
    adds no upstream work; a `scratch` run never saw the corpus and is not gated."""
    if not AUDIT_ENFORCE or wildcards.init == "scratch" or not PRETRAIN:
        return []
    return f"{RESULTS}/leakage/{wildcards.dataset}.json"


def nproc_param(wc, resources):
    """Training rules' `--nproc`: `auto` (one DDP process per GPU the job sees) with more than one GPU, else 1."""
    return "auto" if int(resources.gpu) > 1 else "1"


def nodes_param(wc, resources):
    """Training rules' `--nodes`: the rule's `nodes` resource (SLURM profile), else 0 (this node only, no srun)."""
    return int(resources.get("nodes", 0) or 0)
