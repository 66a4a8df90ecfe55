"""``voco check``: validate a whole plan in seconds, without data and without a GPU.

What runs is what is checked: the same resolver (:mod:`voco.config`), the same per-rule slices and card resolution, the
same model builders (on PyTorch's ``meta`` device: shapes without memory or compute), the same job arithmetic
(:mod:`voco.dag`). Every problem is a :class:`Finding` that names the file, the key, the value and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from voco.config import RULE_SECTIONS, Config, load_card, region_params, repo_root
from voco.data.hub import is_pinned
from voco.errors import VocoError

log = logging.getLogger(__name__)

LEVELS = ("error", "warning", "info")


@dataclass
class Finding:
    """One result of the check: ``level`` error | warning | info, what it is about and how to fix it."""

    level: str
    area: str
    where: str
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> fix: {self.fix}" if self.fix else ""
        return f"{self.level.upper():7s} [{self.area}] {self.where}: {self.message}{fix}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, level: str, area: str, where: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding(level, area, where, message, fix))

    def count(self, area: str, n: int = 1) -> None:
        self.checked[area] = self.checked.get(area, 0) + n

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors


def source_of(cfg: Config, dotted: str) -> str:
    """The file (layer) that set a key of ``cfg``, or "the schema default"."""
    from voco.config import _layer_setting

    layer = _layer_setting(cfg.layers, dotted.split("."))
    return layer.source if layer else "the schema default"


@contextlib.contextmanager
def _guard(report: Report, area: str, where: str, fix: str = "") -> Iterator[None]:
    """Record a VocoError (or any failure of a model build) as an error finding instead of stopping the check."""
    try:
        yield
    except VocoError as e:
        report.add("error", area, where, str(e), fix)
    except (RuntimeError, ValueError, TypeError, AssertionError, KeyError, IndexError) as e:
        report.add("error", area, where, f"{type(e).__name__}: {e}", fix)


# ------------------------------------------------------------------------------------------------ cards
def check_cards(cfg: Config, report: Report) -> dict[str, dict]:
    """Load every card the plan uses (schema + finetune keys) and check what its keys mean."""
    from voco import dag

    pretrain, downstream, everything = dag.datasets(cfg)
    ids = list(dict.fromkeys(everything + list(cfg["vocomni"]["sources"]) + list(cfg["pretrain"]["omni"]["unlabelled"])))
    cards: dict[str, dict] = {}
    classes = set(cfg["vocomni"]["classes"])
    for d in ids:
        with _guard(report, "card", d, "fix the card (config/schemas/dataset.schema.yaml describes every key)"):
            card = load_card(d, cfg["cards_dir"])
            cards[d] = card
            report.count("cards")
            where = card["_path"]
            if card["region"] not in cfg["preprocess"]["regions"]:
                report.add("error", "card", where, f"key region: {card['region']!r} has no defaults in "
                           "preprocess.regions", "add the region to preprocess.regions or change the card's region")
            if d in downstream and card.get("task", "segmentation") == "segmentation":
                labels = {str(k): v for k, v in (card.get("labels") or {}).items()}
                if "0" not in labels or len(labels) < 2:
                    report.add("error", "card", where, f"key labels: {labels} (a segmentation task needs '0' and at "
                               "least one class)", "list every label value and class name")
            if d in downstream and card.get("task") == "classification" and len(card.get("labels") or {}) < 2:
                report.add("error", "card", where, "key labels: a classification task needs >= 2 classes",
                           "list the class names by index")
            bad = sorted(set((card.get("vocomni_map") or {}).values()) - classes)
            if bad:
                report.add("error", "card", where, f"key vocomni_map: {bad} not among vocomni.classes",
                           "map to one of the VoComni class names (vocomni.classes)")
            modality = {str(k): str(v) for k, v in (card.get("modality") or {"0": "CT"}).items()}
            if any(v.upper() != "CT" for v in modality.values()) and not (card.get("preprocess") or {}).get("spacing"):
                report.add("warning", "card", where, f"key modality: {modality} is not CT and the card sets no "
                           "preprocess.spacing (the region default is used)", "give the MRI spacing in the card")
            if not card.get("expected_count"):
                report.add("warning", "card", where, f"no expected_count: it gets preprocess.shards "
                           f"({cfg['preprocess']['shards']}) shards", "state how many volumes the source has")
            src = card["source"]
            local = (cfg["download"].get("local") or {}).get(d)
            if local and not Path(local).exists():
                report.add("error", "card", f"download.local.{d}", f"{local} does not exist",
                           "point download.local at the folder of your copy")
            elif src["kind"] == "local" and not Path(src.get("path", "")).exists():
                report.add("warning", "card", where, f"key source.path: {src.get('path')!r} does not exist here",
                           "give the folder of your copy (or download.local)")
            elif src["kind"] == "manual" and not local:
                report.add("info", "card", where, "source.kind manual: needs a local copy (download.local."
                           f"{d}: /path) or the download fails with the card's instructions")
            elif src["kind"] == "http" and not (src.get("sha256") or src.get("md5") or src.get("checksums")):
                report.add("warning", "card", where, "http source without a checksum",
                           "add source.sha256 (voco download --sha256 HEX verifies a first copy)")
            elif src["kind"] == "huggingface" and not is_pinned(src.get("revision")) and not local:
                report.add("warning", "card", where,
                           f"Hugging Face source.revision {src.get('revision', 'main')!r} is a placeholder, not a "
                           "pinned commit: voco download refuses it without --allow-unpinned",
                           "put the 40-hex commit in source.revision (voco download --allow-unpinned resolves one "
                           "and records it in SOURCE.json)")
            split_file = (card.get("split") or {}).get("file")
            if split_file:
                data = Path(cfg["paths"]["data"])
                cands = [Path(split_file)] if Path(split_file).is_absolute() else [
                    Path(where).parent / split_file, data / "raw" / d / split_file, data / "nifti" / d / split_file]
                if not any(c.is_file() for c in cands) and (data / "raw" / d).exists():
                    report.add("error", "card", where, f"key split.file: {split_file!r} not found in "
                               f"{', '.join(str(c.parent) for c in cands)}", "put the split file there")
    return cards


# ------------------------------------------------------------------------------------------------ rules
def check_rules(cfg: Config, cards: Mapping[str, dict], report: Report) -> None:
    """Every rule's resolved parameters (its slice; per dataset where the rule has a dataset wildcard)."""
    from voco import dag

    pretrain, downstream, everything = dag.datasets(cfg)
    per_dataset = {
        "synth": [d for d in everything if d in cards and cards[d]["source"]["kind"] == "synthetic"],
        "download": [d for d in everything if d in cards and cards[d]["source"]["kind"] != "synthetic"],
        "convert": everything, "preprocess": everything,
        "pseudolabel": dag.unlabelled(cfg, cards) if all(d in cards for d in pretrain) else [],
        "finetune": downstream, "evaluate": downstream,
    }
    for rule in RULE_SECTIONS:
        datasets = per_dataset.get(rule, [None])
        for d in datasets:
            if d is not None and d not in cards:
                continue
            with _guard(report, "rule", f"{rule}{'[' + d + ']' if d else ''}"):
                sl = cfg.slice(rule)
                if d is not None and "cards_dir" in sl:
                    sl = sl.for_dataset(cards[d])
                report.count("rule slices")
                if rule == "preprocess" and d is not None:
                    p = region_params(sl, cards[d])
                    if any(r < 1 for r in p["roi"]) or p["window"][0] >= p["window"][1]:
                        report.add("error", "rule", f"preprocess[{d}]", f"window {p['window']} / roi {p['roi']}",
                                   "the window's low must be below its high")


# ------------------------------------------------------------------------------------------------ models
@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the meta device (shapes, no memory). MONAI's Swin turns ``torch.linspace(...)`` into Python
    floats at construction, which a meta tensor cannot do: those few stay on the CPU."""
    import torch

    orig = torch.linspace

    def linspace(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("device", "cpu")
        return orig(*args, **kwargs)

    torch.linspace = linspace
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.linspace = orig


def _forward(net: Any, shape: Sequence[int]) -> Any:
    import torch

    with torch.no_grad():
        return net(torch.empty(*shape, device="meta"))


@dataclass
class Network:
    """One network the plan trains: where it is used, the key that sets its crop, the crop, and how to build it."""

    where: str
    key: str
    origin: str
    name: str
    roi: list[int]
    build: Callable[[], None]


def planned_networks(cfg: Config, cards: Mapping[str, dict], report: Report) -> list[Network]:
    """Every network of the plan with its crop (pure Python; ``build`` imports torch only when called)."""
    from voco import dag
    from voco.eval import plan

    m = cfg["model"]
    pre = cfg["pretrain"]
    pretrain, downstream, _ = dag.datasets(cfg)
    stages = dag.pretrain_stages(cfg)
    nets: list[Network] = []
    n_cls = len(cfg["vocomni"]["classes"])

    def origin(key: str) -> str:
        return source_of(cfg, key)

    if pretrain and ("ssl" in stages or {"stage1", "stage2"} & set(stages)):
        method = pre["method"]
        from voco.train.settings import ssl_settings

        ssl = ssl_settings(cfg, method)
        side = int(ssl.get("out_size", 64)) if method == "voco-v1" else int(ssl["roi"])
        key = "pretrain.voco.v1.out_size" if method == "voco-v1" else "pretrain.voco.roi"

        def ssl_build(method: str = method, ssl: dict = ssl, side: int = side) -> None:
            from voco.train.pretrain_ssl import build_ssl

            student, _ = build_ssl(cfg, method, ssl)
            z, _ = _forward(student.eval(), (2, 1, side, side, side))
            if tuple(z.shape) != (2, int(ssl["out_dim"])):
                raise ValueError(f"projector output {tuple(z.shape)}, expected (2, {ssl['out_dim']})")
        nets.append(Network(f"pretrain_ssl ({method}, {m['name']}, crop {side}^3)", key, origin(key), m["name"],
                            [side] * 3, ssl_build))
    if pretrain and {"stage1", "stage2"} & set(stages):
        roi = list(pre["omni"]["roi"] or cfg["preprocess"]["roi"])
        key = "pretrain.omni.roi" if pre["omni"]["roi"] else "preprocess.roi"

        def omni_build(roi: list = roi) -> None:
            from voco.omni.stages import build_omni
            from voco.train.settings import ssl_settings

            net, _ = build_omni(cfg, "voco", ssl_settings(cfg, "voco"), n_cls)
            out = _forward(net.ssl.backbone.eval(), (1, 1, *roi))
            if tuple(out.shape[1:]) != (n_cls, *roi):
                raise ValueError(f"segmentation output {tuple(out.shape)} for a {roi} crop")
        nets.append(Network(f"pretrain_stage1/2 ({m['name']}, labelled crop {roi})", key, origin(key), m["name"], roi,
                            omni_build))
        vroi = list(cfg["vocomni"]["roi"] or cfg["preprocess"]["roi"])
        vkey = "vocomni.roi" if cfg["vocomni"]["roi"] else "preprocess.roi"
        for i, mem in enumerate(cfg["vocomni"]["members"]):
            def member_build(mem: dict = mem, roi: list = vroi) -> None:
                from voco.models import build_model

                net = build_model(mem["model"], 1, n_cls, size=mem.get("size", "B"),
                                  feature_size=mem.get("feature_size"))
                _forward(net.eval(), (1, 1, *roi))
            nets.append(Network(f"vocomni.members[{i}] ({mem['model']}, {vroi})", vkey, origin(vkey), mem["model"],
                                vroi, member_build))
    if pretrain and "suprem" in stages:
        sp = pre["suprem"]
        name = sp["model"] or m["name"]
        roi = list(sp["roi"] or cfg["preprocess"]["roi"])
        key = "pretrain.suprem.roi" if sp["roi"] else "preprocess.roi"

        def suprem_build(name: str = name, roi: list = roi) -> None:
            from voco.models import build_model

            net = build_model(name, 1, n_cls, size=sp["size"] or m["size"],
                              feature_size=sp["feature_size"] or (m["feature_size"] if name == m["name"] else None))
            _forward(net.eval(), (1, 1, *roi))
        nets.append(Network(f"pretrain_suprem ({name}, {roi})", key, origin(key), name, roi, suprem_build))

    from voco.train.settings import model_spec, num_classes

    probed: dict[tuple, tuple] = {}  # (arch without the class count, roi) -> output shape of one forward
    for d in downstream:
        if d not in cards or cards[d].get("task", "segmentation") not in plan.TASKS:
            continue
        card = cards[d]
        with _guard(report, "model", f"finetune[{d}]"):
            ft = cfg.for_dataset(card)["finetune"]
            roi = [int(r) for r in ft["roi"]]
            where = f"finetune[{d}] ({card['_path']})"
            from_card = "roi" in (card.get("finetune") or {}) and "roi" not in (cfg.user.get("finetune") or {})
            if "medcontext" in plan.methods_for(cfg, card):
                cube = int(ft["medcontext"]["cube"])
                if any(r % cube for r in roi[:2]):
                    report.add("error", "model", where, f"key finetune.medcontext.cube = {cube} (set by "
                               f"{origin('finetune.medcontext.cube')}) does not divide the in-plane ROI {roi[:2]}",
                               "choose a cube side that divides the ROI")
            in_ch = len(card.get("modality") or {"0": "CT"})
            arch = {**model_spec(cfg), "task": card.get("task", "segmentation"), "in_channels": in_ch,
                    "out_channels": num_classes(card)}

            def ft_build(arch: dict = arch, roi: list = roi) -> None:
                from voco.train.finetune import build_network

                # one forward per architecture and ROI: the class count only changes the 1x1x1 output layer
                key = (tuple(sorted((k, str(v)) for k, v in arch.items() if k != "out_channels")), tuple(roi))
                if key not in probed:
                    probe = build_network({**arch, "out_channels": 2})
                    probed[key] = tuple(_forward(probe.eval(), (1, arch["in_channels"], *roi)).shape)
                build_network(arch)
                got = (1, arch["out_channels"], *probed[key][2:])
                want = (1, arch["out_channels"]) if arch["task"] == "classification" else (
                    1, arch["out_channels"], *roi)
                if got != want:
                    raise ValueError(f"output {got}, expected {want}")
            nets.append(Network(f"finetune[{d}] ({m['name']}, {in_ch} ch -> {arch['out_channels']} classes, "
                                f"roi {roi})", "finetune.roi", card["_path"] if from_card else
                                origin("finetune.roi"), m["name"], roi, ft_build))
    return nets


def check_geometry(nets: Sequence[Network], cfg: Config, report: Report) -> list[Network]:
    """Crop / ROI sides against each backbone's patch and downsampling (no torch). Returns the sound networks."""
    from voco.shapes import MIN_SIDE, bad_sides

    ok = []
    for net in nets:
        report.count("crop geometries")
        if bad_sides(net.name, net.roi):
            step = MIN_SIDE[net.name]
            fix = [max(step, int(r) // step * step) for r in net.roi]
            report.add("error", "model", net.where, f"key {net.key} = {net.roi} (set by {net.origin}): {net.name} "
                       f"(model.name, set by {source_of(cfg, 'model.name')}) needs every side a multiple of {step}",
                       f"set {net.key} to multiples of {step}, e.g. {fix}")
        else:
            ok.append(net)
    return ok


def check_models(nets: Sequence[Network], report: Report) -> None:
    """Build every network on the meta device and push one crop through it (shapes, no memory, no compute)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # pragma: no cover - the workflow may parse without torch
        report.add("warning", "model", "torch", "PyTorch is not importable here: model builds not checked")
        return
    for net in nets:
        with _guard(report, "model", net.where):
            with meta_device():
                net.build()
            report.count("model builds")


# ------------------------------------------------------------------------------------------------ inits
def check_inits(cfg: Config, cards: Mapping[str, dict], report: Report) -> None:
    """Fine-tuning inits: a file that exists is loaded into the first downstream network (what loads, what stays)."""
    from voco import dag
    from voco.eval import plan
    from voco.inits import RELEASED

    pretrain, downstream, _ = dag.datasets(cfg)
    made_by_dag = {"ssl": "pretrain_ssl", "stage1": "pretrain_stage1", "stage2": "pretrain_stage2",
                   "suprem": "pretrain_suprem"}
    target = next((d for d in downstream if d in cards and cards[d].get("task", "segmentation") == "segmentation"),
                  None)
    for init in cfg["finetune"]["inits"]:
        init = str(init)
        if init == "scratch":
            continue
        files = plan.init_checkpoint(cfg, init)
        path = Path(files[0]) if files else None
        if path is None:
            continue
        external = init not in made_by_dag
        if not path.is_file():
            if not external and not pretrain:
                report.add("error", "init", f"finetune.inits: {init} (set by {source_of(cfg, 'finetune.inits')})",
                           f"init checkpoint {path} not found, and datasets.pretrain is empty, so no rule can make it",
                           f"list the pre-training datasets, put a checkpoint at {path}, or remove {init!r}")
            elif external:
                released = RELEASED.get(init)
                hint = (f"download {released.url} to {path} (no rule fetches released weights), or remove it from "
                        "finetune.inits" if released is not None else
                        "give the path of a released or saved checkpoint, or remove it from finetune.inits")
                report.add("error", "init", f"finetune.inits: {init}", f"init checkpoint {path} not found", hint)
            else:
                report.add("info", "init", init, f"{path} will be built by rule {made_by_dag[init]}")
            continue
        report.count("init checkpoints")
        if target is None:
            continue
        if not external and pretrain:
            # a checkpoint of ours that the plan builds: an existing file made by another configuration (e.g. the
            # laptop demo's before a paper run) is rebuilt, because its rule's settings changed, not loaded as it is
            try:
                loaded = _load_init(cfg, cards, target, path)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                report.add("warning", "init", f"finetune.inits: {init} ({path})",
                           f"the existing file does not fit this configuration's model ({type(e).__name__}: "
                           f"{str(e)[:160]})", f"rule {made_by_dag[init]} rebuilds it (its settings differ); "
                           "nothing to do unless you meant to keep it")
            else:
                _init_info(report, init, path, *loaded)
            continue
        with _guard(report, "init", f"finetune.inits: {init} ({path})"):
            _init_info(report, init, path, *_load_init(cfg, cards, target, path))


def _load_init(cfg: Config, cards: Mapping[str, dict], target: str, path: Path) -> tuple[str, str, Any, Any]:
    """Load ``path`` into ``target``'s segmentation network built on the meta device; (target, model name, net, report)."""
    from voco.models import load_pretrained
    from voco.train.finetune import build_network
    from voco.train.settings import HEAD_PREFIX, model_spec, num_classes

    card = cards[target]
    arch = {**model_spec(cfg), "task": "segmentation", "in_channels": len(card.get("modality") or {"0": 1}),
            "out_channels": num_classes(card)}
    with meta_device():  # names and shapes are all the contract needs
        net = build_network(arch)
    with warnings.catch_warnings():  # copying into meta parameters is the intended no-op
        warnings.simplefilter("ignore", UserWarning)
        rep = load_pretrained(net, path, exclude=(HEAD_PREFIX.get(arch["name"], "out."),))
    return target, arch["name"], net, rep


def _init_info(report: Report, init: str, path: Path, target: str, name: str, net: Any, rep: Any) -> None:
    enc = [n for n in rep.missing if not n.startswith(tuple(getattr(net, "decoder_prefixes", ())))]
    report.add("info", "init", f"{init} ({path})",
               f"into {target}'s {name}: {len(rep.loaded)} tensors load, {len(rep.mismatched)} "
               f"shape-mismatched, {len(rep.skipped)} not in the model, {len(rep.missing)} left at init "
               f"({len(enc)} of them in the encoder)")
    if enc and len(enc) > len(rep.loaded):
        report.add("warning", "init", f"{init} ({path})", f"most encoder tensors stay at init ({enc[:3]}...)",
                   "check that the checkpoint matches model.name / size")


# ------------------------------------------------------------------------------------------------ profiles
RULE_RE = re.compile(r"^rule (\w+):", re.M)
NUMERIC_RESOURCES = ("mem_mb", "runtime", "gpu", "cpus_per_gpu", "cpus_per_task", "nodes", "tasks")


def workflow_rules(root: Path | None = None) -> set[str]:
    root = root or repo_root()
    names: set[str] = set()
    for p in sorted((root / "rules").glob("*.smk")) + [root / "workflow" / "Snakefile"]:
        if p.is_file():
            names.update(RULE_RE.findall(p.read_text()))
    return names


def check_profiles(report: Report, root: Path | None = None) -> None:
    """Each shipped Snakemake profile against the rules: rule names, numeric resources, GPU rules, config files."""
    root = root or repo_root()
    rules = workflow_rules(root)
    gpu_rules = {"pretrain_ssl", "pretrain_stage1", "pretrain_stage2", "pretrain_suprem", "vocomni", "pseudolabel",
                 "finetune", "evaluate"}
    for prof in sorted((root / "config" / "profiles").glob("*/config.yaml")):
        where = str(prof.relative_to(root))
        try:
            doc = yaml.safe_load(prof.read_text()) or {}
        except yaml.YAMLError as e:
            report.add("error", "profile", where, f"not valid YAML: {e}")
            continue
        report.count("profiles")
        for key in ("set-resources", "set-threads"):
            for rule in (doc.get(key) or {}):
                if rule not in rules:
                    report.add("error", "profile", where, f"key {key}.{rule}: no such rule",
                               f"rule names: {', '.join(sorted(rules))}")
        for rule, res in (doc.get("set-resources") or {}).items():
            for k, v in (res or {}).items():
                if k in NUMERIC_RESOURCES and not (isinstance(v, int | float) and v >= 0):
                    report.add("error", "profile", where, f"key set-resources.{rule}.{k}: {v!r} is not a number >= 0")
            gpus = (res or {}).get("gpu", 0) or 0
            if doc.get("executor") == "slurm" and rule in gpu_rules and isinstance(gpus, int | float) and gpus > 0:
                if not (res or {}).get("slurm_partition") and not (doc.get("default-resources") or {}).get(
                        "slurm_partition"):
                    report.add("warning", "profile", where, f"{rule} asks for GPUs without a slurm_partition")
        for f in doc.get("configfiles") or doc.get("configfile") or []:
            if not (root / f).is_file():
                report.add("error", "profile", where, f"key configfiles: {f} does not exist")
        if doc.get("executor") == "slurm":
            missing = sorted(r for r in gpu_rules if r in rules and r not in (doc.get("set-resources") or {}))
            if missing:
                report.add("warning", "profile", where, f"GPU rules without cluster resources: {missing}")


# ------------------------------------------------------------------------------------------------ plan
def check_plan(cfg: Config, cards: Mapping[str, dict], report: Report) -> None:
    from voco import dag

    _, _, everything = dag.datasets(cfg)
    if not all(d in cards for d in everything):
        return
    counts = dag.job_counts(cfg, cards)
    report.jobs = dict(counts)
    cases = sum(int(cards[d].get("expected_count") or 0) for d in everything)
    sharded = counts.get("preprocess", 0) + counts.get("pseudolabel", 0)
    bound = 2 * (len(everything) + -(-cases // int(cfg["preprocess"]["cases_per_shard"])))
    if sharded > bound:
        report.add("warning", "plan", "preprocess.cases_per_shard", f"{sharded} sharded jobs for {cases} cases")


def run_check(cfg: Config, root: Path | None = None, models: bool = True) -> Report:
    """All checks of one resolved config; never raises for a problem of the plan (it becomes a finding)."""
    t0 = time.perf_counter()
    report = Report()
    cards = check_cards(cfg, report)
    check_rules(cfg, cards, report)
    nets = check_geometry(planned_networks(cfg, cards, report), cfg, report)
    if models:
        check_models(nets, report)
    check_inits(cfg, cards, report)
    check_profiles(report, root)
    check_plan(cfg, cards, report)
    report.seconds = time.perf_counter() - t0
    return report


def format_report(cfg: Config, report: Report, verbose: bool = False) -> str:
    from voco import dag

    lines = [f"voco check: experiment {cfg['experiment']}; layers (lowest first): "
             + ", ".join(f"{layer.kind} {layer.source}" for layer in cfg.layers)]
    lines.append("checked: " + ", ".join(f"{v} {k}" for k, v in report.checked.items()))
    if report.jobs:
        lines.append(f"plan: {sum(report.jobs.values())} jobs from scratch ({dag.summarize(report.jobs)})")
    shown = [f for f in report.findings if verbose or f.level != "info"]
    lines += [f.line() for f in shown]
    n_err, n_warn = len(report.errors), sum(f.level == "warning" for f in report.findings)
    verdict = "OK" if report.ok else "FAILED"
    lines.append(f"{verdict}: {n_err} error(s), {n_warn} warning(s) in {report.seconds:.1f} s")
    return "\n".join(lines)
