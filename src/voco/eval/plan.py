"""The downstream run grid (dataset x init x method x N x seed) and its paths, for rules/downstream.smk and tests.

Pure standard-library Python (imported by the Snakefile at parse time; no torch / numpy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from voco import inits as _inits

TASKS = ("segmentation", "classification")


def methods_for(cfg: Mapping, card: Mapping) -> list[str]:
    """Methods run on a dataset: ``finetune.methods`` (+ medcontext where listed); classification: plain only."""
    if card.get("task", "segmentation") == "classification":
        return ["plain"]
    ft = cfg["finetune"]
    methods = list(ft["methods"])
    if card["id"] in ft.get("medcontext_datasets", []) and "medcontext" not in methods:
        methods.append("medcontext")
    return methods


#: grid keys a dataset card's ``finetune`` section may narrow for its own dataset (e.g. no few-shot N for a
#: classification task whose two cases could hold one class)
GRID_KEYS = ("inits", "n_train", "seeds")


def grid(cfg: Mapping, card: Mapping) -> dict:
    """The config's ``finetune`` grid keys, with the card's own ``finetune`` values where it sets them, below the
    user's override files and flags (``cfg.user`` of a resolved :class:`voco.config.Config`), as every other key."""
    own = card.get("finetune") or {}
    user = (getattr(cfg, "user", None) or {}).get("finetune") or {}
    out = {**cfg["finetune"], **{k: own[k] for k in GRID_KEYS if k in own}}
    out.update({k: user[k] for k in GRID_KEYS if k in user})
    return out


def runs(cfg: Mapping, cards: Mapping[str, Mapping], datasets: Sequence[str]) -> list[tuple[str, str, str, str, int]]:
    """(dataset, init, method, n, seed) of every configured downstream run (datasets whose task can be fine-tuned)."""
    out = []
    for d in datasets:
        card = {"id": d, **cards[d]}
        if card.get("task", "segmentation") not in TASKS:
            continue
        ft = grid(cfg, card)
        for init in init_ids(cfg, ft["inits"]):
            for method in methods_for(cfg, card):
                for n in ft["n_train"]:
                    for seed in ft["seeds"]:
                        out.append((d, init, method, str(n), int(seed)))
    return out


def run_dir(runs_root: str, d: str, init: str, method: str, n: str | int, seed: int) -> str:
    return f"{runs_root}/finetune/{d}/{init}/{method}/n{n}-s{seed}"


def result_dir(results_root: str, d: str, init: str, method: str, n: str | int, seed: int) -> str:
    return f"{results_root}/{d}/{init}/{method}/n{n}-s{seed}"


def init_ids(cfg: Mapping, inits: Sequence[str] | None = None) -> list[str]:
    """The init ids of ``finetune.inits`` (or of ``inits``, e.g. a card's narrowed grid; ``file:<path>`` ->
    ``file-<stem>``; see :mod:`voco.inits`), in order, without repeats."""
    entries = cfg["finetune"]["inits"] if inits is None else inits
    return list(dict.fromkeys(_inits.init_id(e) for e in entries))


def init_wildcard(cfg: Mapping) -> str:
    """Regex alternation of the configured init ids (the ``{init}`` wildcard constraint)."""
    import re

    ids = init_ids(cfg)
    return "|".join(re.escape(i) for i in ids) if ids else "(?!x)x"


def init_checkpoint(cfg: Mapping, init: str) -> list[str]:
    """The checkpoint an init starts from ([] for scratch).

    Our stages: ``<runs>/pretrain/<pretrain_run>/<init>/backbone.pt``, the clean backbone export every pre-training
    rule writes (``final.pt`` holds the whole training state, e.g. the omni stages wrap the backbone in their SSL /
    segmentation modules). Released checkpoints by name: ``<data>/weights/<file>``; ``file:<path>`` entries (or their
    ids ``file-<stem>``): the path.
    """
    init = _inits.init_id(init)  # a finetune.inits entry (file:<path>) or its id
    if init == "scratch":
        return []
    if init not in _inits.OURS:
        path = _inits.init_paths(list(cfg["finetune"]["inits"]), cfg["paths"].get("data", "data")).get(init)
        if path:
            return [str(path)]
    return [f"{cfg['paths']['runs']}/pretrain/{cfg['finetune']['pretrain_run']}/{init}/backbone.pt"]


def summaries(cfg: Mapping, cards: Mapping[str, Mapping], datasets: Sequence[str]) -> list[str]:
    return [f"{result_dir(cfg['paths']['results'], *r)}/summary.json" for r in runs(cfg, cards, datasets)]


def run_files(cfg: Mapping, cards: Mapping[str, Mapping], datasets: Sequence[str], name: str) -> list[str]:
    return [f"{run_dir(cfg['paths']['runs'], *r)}/{name}" for r in runs(cfg, cards, datasets)]
