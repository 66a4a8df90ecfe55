"""Typed view of the resolved configuration: one frozen dataclass per config section.

GENERATED from config/schemas/config.schema.yaml by ``python -m voco.settings_codegen > src/voco/settings.py``;
do not edit by hand (tests/test_config_layers.py checks that this file matches the schema).

Build with ``Settings.from_dict(resolved)`` (voco.config does it once per resolved config and exposes it as
``Config.settings``); every field is required, so a key missing from the resolved config or unknown to the schema fails
at build time, naming the section.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal


class SettingsError(ValueError):
    """The resolved config does not fit the typed sections (a key is missing or unknown)."""


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data))
    if unknown or missing:
        raise SettingsError(f"{where}: unknown key(s) {unknown} / missing key(s) {missing}")
    kw = {}
    for f in fields(cls):
        sub = _NESTED.get((cls.__name__, f.name))
        value = data[f.name]
        if sub is None:
            kw[f.name] = value
        elif sub[1] == "one":
            kw[f.name] = _build(sub[0], value, f"{where}.{f.name}")
        elif sub[1] == "list":
            kw[f.name] = [_build(sub[0], v, f"{where}.{f.name}[{i}]") for i, v in enumerate(value)]
        else:  # "map": free-form keys, typed values
            kw[f.name] = {k: _build(sub[0], v, f"{where}.{f.name}.{k}") for k, v in value.items()}
    return cls(**kw)

@dataclass(frozen=True)
class Paths:
    """where outputs go (relative to the working directory, i.e. the repository root)"""

    data: str
    runs: str
    results: str
    logs: str

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'paths') -> Paths:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Datasets:
    """which dataset cards this run uses, by role"""

    pretrain: list[Any]
    downstream: list[Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'datasets') -> Datasets:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Synth:
    """the embedded default data generator (voco synth); per-dataset settings are in the dataset cards"""

    seed: int
    spacing_scale: float

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'synth') -> Synth:
        return _build(cls, data, where)

@dataclass(frozen=True)
class PreprocessRegionsEntry:
    """preprocess/regions_entry"""

    spacing: list[Any]
    window: list[Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'preprocess/regions_entry') -> PreprocessRegionsEntry:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Preprocess:
    """pre-processing (SPEC 1); region defaults, overridden per dataset card"""

    shards: int
    cases_per_shard: int
    roi: list[Any]
    storage_dtype: Literal['float16', 'float32']
    regions: dict[str, PreprocessRegionsEntry]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'preprocess') -> Preprocess:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Download:
    """voco download: where raw data comes from (mirrors, retries, local copies); tokens come from the environment only"""

    hf_base: str | None
    token_hosts: list[Any]
    workers: int
    allow_unpinned: bool
    max_extract_bytes: int
    max_members: int
    max_ratio: float
    mirrors: dict[str, str]
    retries: int
    backoff_s: float
    backoff_max_s: float
    timeout_s: float
    token_env: str
    keep_archives: bool
    local: dict[str, str]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'download') -> Download:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Audit:
    """leakage audit (voco audit-leakage): pre-training corpus vs every case evaluation scores (test split, or the validation carve-out of training)"""

    enforce: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'audit') -> Audit:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Model:
    """the backbone every stage trains (voco.models.build_model); downstream may override per card"""

    name: Literal['swinunetr', 'unet', 'segresnet', 'cnn_small']
    size: Literal['B', 'L', 'H']
    feature_size: int | None
    use_checkpoint: bool
    window_attention: Literal['efficient', 'monai']

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'model') -> Model:
        return _build(cls, data, where)

@dataclass(frozen=True)
class VocomniMembersItem:
    """vocomni/members_item"""

    model: Literal['swinunetr', 'unet', 'segresnet', 'cnn_small']
    size: Literal['B', 'L', 'H']
    feature_size: int | None
    seed: int

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'vocomni/members_item') -> VocomniMembersItem:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Vocomni:
    """VoComni curation (SPEC 3, voco vocomni): an ensemble of supervised models completes the partial labels of the labelled sources; low-confidence volumes are dropped"""

    classes: list[Any]
    sources: list[Any]
    members: list[VocomniMembersItem]
    steps: int
    crops_per_step: int
    pos_neg: list[Any]
    lr: float
    weight_decay: float
    roi: list[Any]
    overlap: float
    sw_batch_size: int
    min_confidence: float
    min_agreement: float

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'vocomni') -> Vocomni:
        return _build(cls, data, where)

@dataclass(frozen=True)
class PretrainVocoAugment:
    """independent per-crop augmentation, applied after the position labels are computed"""

    flip_p: float
    rot90_p: float
    shift: float
    shift_p: float

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'pretrain/voco/augment') -> PretrainVocoAugment:
        return _build(cls, data, where)

@dataclass(frozen=True)
class PretrainVocoV1:
    """method voco-v1 (CVPR 2024) overrides: whole volume resized to (g*r) x (g*r) x r, crops resized to out_size^3, no inter-volume term, EMA of the whole network"""

    grid: int
    roi: int
    out_size: int
    hidden_dim: int
    out_dim: int
    momentum: float
    symmetric: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'pretrain/voco/v1') -> PretrainVocoV1:
        return _build(cls, data, where)

@dataclass(frozen=True)
class PretrainVoco:
    """VoCo self-supervision geometry, heads and losses (SPEC 2; voco.ssl, read by voco.train.pretrain_ssl); defaults = SPEC / the TPAMI reference; the v1 block overrides them for method voco-v1"""

    grid: int
    roi: int
    sw: int
    loss_form: Literal['spec', 'paper']
    w_pred: float
    w_inter: float
    w_reg: float
    momentum: float
    feature_dropout: Literal['row', 'element']
    feature_dropout_p: float
    hidden_dim: int
    out_dim: int
    augment: PretrainVocoAugment
    pad_value: float
    region_weights: dict[str, float]
    default_region_weight: float
    region_mode: Literal['region', 'volume']
    v1: PretrainVocoV1

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'pretrain/voco') -> PretrainVoco:
        return _build(cls, data, where)

@dataclass(frozen=True)
class PretrainOmniAugment:
    """SPEC 6 augmentation of every labelled and pseudo-labelled crop (voco.data.augment): flips, x-y rot90, intensity scale / shift"""

    flip_p: float
    rot90_p: float
    intensity: float
    intensity_p: float

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'pretrain/omni/augment') -> PretrainOmniAugment:
        return _build(cls, data, where)

@dataclass(frozen=True)
class PretrainOmni:
    """omni-supervised stages (SPEC 3): stage 1 = SSL + DiceCE on VoComni labels; pseudo-labels; stage 2 = SSL + DiceCE on labelled + pseudo-labelled crops"""

    stage1_steps: int
    stage2_steps: int
    sw: int | None
    labelled: str
    unlabelled: list[Any]
    labelled_crops: int
    pseudo_crops: int
    pos_neg: list[Any]
    roi: list[Any]
    sup_weight: float
    pseudo_weight: float
    augment: PretrainOmniAugment
    stage2_pseudo: Literal['offline', 'online']
    pseudo_min_confidence: float
    pseudo_overlap: float
    sw_batch_size: int
    lr: float | None
    warmup: int | None
    batch_size: int | None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'pretrain/omni') -> PretrainOmni:
        return _build(cls, data, where)

@dataclass(frozen=True)
class PretrainSupremAugment:
    """SPEC 6 augmentation of every labelled crop (voco.data.augment): flips, x-y rot90, intensity scale / shift"""

    flip_p: float
    rot90_p: float
    intensity: float
    intensity_p: float

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'pretrain/suprem/augment') -> PretrainSupremAugment:
        return _build(cls, data, where)

@dataclass(frozen=True)
class PretrainSuprem:
    """supervised-only pre-training (method suprem, SPEC 5): per-class sigmoid Dice + BCE on the labelled pool, loss masked to each source's classes"""

    model: Literal['swinunetr', 'unet', 'segresnet', 'cnn_small', None] | None
    size: Literal['B', 'L', 'H', None] | None
    feature_size: int | None
    labels: Literal['sources', 'vocomni']
    steps: int
    crops_per_step: int
    pos_neg: list[Any]
    roi: list[Any]
    lr: float
    weight_decay: float
    warmup: int
    augment: PretrainSupremAugment

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'pretrain/suprem') -> PretrainSuprem:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Pretrain:
    """pre-training (SPEC 2-5) - loop settings, VoCo SSL (voco), omni stages (omni), SuPreM (suprem)"""

    voco: PretrainVoco
    omni: PretrainOmni
    suprem: PretrainSuprem
    run: str
    method: Literal['voco', 'voco-v1']
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    amsgrad: bool
    warmup: int
    grad_clip: float | None
    checkpoint_every: int
    amp: Literal['auto', 'bf16', 'fp16', 'off', True, False]
    num_workers: Any
    max_bad_steps: int
    seed: int
    log_every: int

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'pretrain') -> Pretrain:
        return _build(cls, data, where)

@dataclass(frozen=True)
class FinetuneMedcontext:
    """MedContext (SPEC 6)"""

    mask_ratio: float
    cube: int
    beta: float
    momentum: float
    loss_form: Literal['paper', 'reference']

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'finetune/medcontext') -> FinetuneMedcontext:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Finetune:
    """downstream fine-tuning (SPEC 6); per-dataset overrides of these keys go in a card's `finetune` section"""

    pretrain_run: str
    inits: list[Any]
    methods: list[Any]
    medcontext_datasets: list[Any]
    n_train: list[Any]
    seeds: list[Any]
    steps: int
    epochs: int | None
    batch_size: int
    samples_per_volume: int
    roi: list[Any]
    pos_neg: list[Any]
    include_background: bool
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None
    flip_p: float
    rot90_p: float
    intensity: float
    intensity_p: float
    exclude_head: bool
    in_channels_mode: Literal['repeat', 'reinit']
    checkpoint_every: int
    log_every: int
    num_workers: Any
    amp: Literal['auto', 'bf16', 'fp16', 'off', True, False]
    max_bad_steps: int
    classification_pool: Literal['encoder', 'encoder_max']
    medcontext: FinetuneMedcontext

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'finetune') -> Finetune:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Evaluate:
    """downstream evaluation (SPEC 6)"""

    overlap: float
    extra_overlaps: list[Any]
    sw_batch_size: int
    blend: Literal['gaussian', 'constant']
    nsd_tolerance_mm: float
    hd_percentile: float
    split: Literal['auto', 'test', 'val']
    original_space: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'evaluate') -> Evaluate:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Report:
    """the report (voco report)"""

    baseline_init: str
    baseline_method: str
    digits: int

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'report') -> Report:
        return _build(cls, data, where)

@dataclass(frozen=True)
class Settings:
    """The one configuration of the voco pipeline. Snakemake validates it (snakemake.utils.validate) and so does the `voco` CLI (voco.config.load_config). Every key has a description and a default; unknown keys are rejected. Experiments (config/experiments/*.yaml) are override files merged onto config/config.yaml."""

    experiment: str
    paths: Paths
    cards_dir: str
    datasets: Datasets
    synth: Synth
    preprocess: Preprocess
    download: Download
    audit: Audit
    model: Model
    vocomni: Vocomni
    pretrain: Pretrain
    finetune: Finetune
    evaluate: Evaluate
    report: Report

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = 'config') -> Settings:
        return _build(cls, data, where)

_NESTED: dict[tuple[str, str], tuple[type, str]] = {
    ('Settings', 'paths'): (Paths, 'one'),
    ('Settings', 'datasets'): (Datasets, 'one'),
    ('Settings', 'synth'): (Synth, 'one'),
    ('Preprocess', 'regions'): (PreprocessRegionsEntry, 'map'),
    ('Settings', 'preprocess'): (Preprocess, 'one'),
    ('Settings', 'download'): (Download, 'one'),
    ('Settings', 'audit'): (Audit, 'one'),
    ('Settings', 'model'): (Model, 'one'),
    ('Vocomni', 'members'): (VocomniMembersItem, 'list'),
    ('Settings', 'vocomni'): (Vocomni, 'one'),
    ('PretrainVoco', 'augment'): (PretrainVocoAugment, 'one'),
    ('PretrainVoco', 'v1'): (PretrainVocoV1, 'one'),
    ('Pretrain', 'voco'): (PretrainVoco, 'one'),
    ('PretrainOmni', 'augment'): (PretrainOmniAugment, 'one'),
    ('Pretrain', 'omni'): (PretrainOmni, 'one'),
    ('PretrainSuprem', 'augment'): (PretrainSupremAugment, 'one'),
    ('Pretrain', 'suprem'): (PretrainSuprem, 'one'),
    ('Settings', 'pretrain'): (Pretrain, 'one'),
    ('Finetune', 'medcontext'): (FinetuneMedcontext, 'one'),
    ('Settings', 'finetune'): (Finetune, 'one'),
    ('Settings', 'evaluate'): (Evaluate, 'one'),
    ('Settings', 'report'): (Report, 'one'),
}
