"""Pure-Python pieces of the workflow that the rules and ``voco check`` share: dataset roles, shards, job counts.

Imported by the Snakefile at parse time (standard library + the config module only: no torch / numpy), so the DAG and
``voco check`` always agree on what a config plans.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from voco.eval import plan as downstream_plan


def shards_for(cfg: Mapping[str, Any], card: Mapping[str, Any]) -> int:
    """Shards of one dataset: ``preprocess.shards`` at most, about ``preprocess.cases_per_shard`` cases each.

    From the card's ``expected_count``; a card without a count gets ``preprocess.shards``. Small datasets get one job,
    160K-case corpora many; every sharded rule (preprocess, pseudolabel) uses this same count."""
    pre = cfg["preprocess"]
    n = card.get("expected_count")
    if not n:
        return int(pre["shards"])
    return max(1, min(int(pre["shards"]), -(-int(n) // int(pre["cases_per_shard"]))))


def datasets(cfg: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(pre-training, downstream, all) dataset ids of a config, in order, without duplicates."""
    pretrain = list(cfg["datasets"]["pretrain"])
    downstream = list(cfg["datasets"]["downstream"])
    return pretrain, downstream, list(dict.fromkeys(pretrain + downstream))


def vocomni_sources(cfg: Mapping[str, Any], cards: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Labelled sources of the VoComni curation: ``vocomni.sources``, else the pre-training cards with role vocomni."""
    pretrain, _, _ = datasets(cfg)
    return list(cfg["vocomni"]["sources"]) or [d for d in pretrain if "vocomni" in cards[d].get("role", [])]


def unlabelled(cfg: Mapping[str, Any], cards: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Datasets the stage-1 model pseudo-labels: ``pretrain.omni.unlabelled``, else cards with role unlabelled."""
    pretrain, _, _ = datasets(cfg)
    omni = cfg["pretrain"]["omni"]
    return list(omni["unlabelled"]) or [d for d in pretrain if "unlabelled" in cards[d].get("role", [])]


def pretrain_stages(cfg: Mapping[str, Any]) -> list[str]:
    """The pre-training runs the configured fine-tuning inits need (ssl, stage1, stage2, suprem)."""
    inits = [str(i) for i in cfg["finetune"]["inits"]]
    return [s for s in ("ssl", "stage1", "stage2", "suprem") if s in inits]


def pretrain_targets(cfg: Mapping[str, Any], cards: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every pre-training output the configured inits need, and the omni quality tables (rule pretrain_all)."""
    stages = pretrain_stages(cfg)
    runs, results = cfg["paths"]["runs"], cfg["paths"]["results"]
    out = [f"{runs}/pretrain/{cfg['pretrain']['run']}/{s}/{f}" for s in stages
           for f in ("final.pt", "backbone.pt", "summary.json")]
    if {"stage1", "stage2"} & set(stages):
        out.append(f"{results}/omni/curation.json")
    if "stage2" in stages and cfg["pretrain"]["omni"]["stage2_pseudo"] != "online":
        out += [f"{results}/omni/pseudo_{d}.json" for d in unlabelled(cfg, cards)]
    return out


def job_counts(cfg: Mapping[str, Any], cards: Mapping[str, Mapping[str, Any]]) -> Counter:
    """Jobs per rule that ``snakemake all`` plans from scratch for ``cfg`` (the same arithmetic as rules/*.smk)."""
    pretrain, downstream, everything = datasets(cfg)
    c: Counter = Counter()
    for d in everything:
        kind = cards[d]["source"]["kind"]
        local = d in (cfg["download"].get("local") or {}) or kind == "local"
        c["synth" if kind == "synthetic" else "link" if local else "download"] += 1
        c["convert"] += 1
        c["preprocess"] += shards_for(cfg, cards[d])
        c["merge_manifest"] += 1
    if downstream:  # the corpus fingerprinted once, one audit per downstream dataset, the merged report
        c["leakage_index"] += 1
        c["audit_leakage_dataset"] += len(downstream)
        c["audit_leakage"] += 1
    c["pretrain_ssl"] += 1
    c["vocomni"] += 1
    c["pretrain_stage1"] += 1
    if cfg["pretrain"]["omni"]["stage2_pseudo"] != "online":
        for d in unlabelled(cfg, cards):
            c["pseudolabel"] += shards_for(cfg, cards[d])
            c["pseudolabel_merge"] += 1
    c["pretrain_stage2"] += 1
    c["pretrain_suprem"] += 1
    runs = downstream_plan.runs(cfg, {d: cards[d] for d in downstream}, downstream)
    c["finetune"] += len(runs)
    c["evaluate"] += len(runs)
    c["evaluate_dataset"] += len({r[0] for r in runs})
    c["report"] += 1
    return c


def summarize(counts: Mapping[str, int], order: Sequence[str] | None = None) -> str:
    names = list(order or counts)
    return ", ".join(f"{k} {counts[k]}" for k in names if counts.get(k))
