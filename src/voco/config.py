"""The configuration: layers, one resolved and validated config, per-dataset resolution, per-rule slices, cards.

Layers, lowest to highest (one rule, the same in every command and in the workflow)::

    schema defaults  <  base (config/config.yaml)  <  experiment files  <  dataset card  <  user override files
    <  command-line flags

* **schema defaults** (``config/schemas/config.schema.yaml``) are the paper's values (SPEC 1-6).
* **base**: ``config/config.yaml``, the embedded laptop default (``make run``), or the file given with ``--config``.
* **experiment files** say what they are: a top-level ``experiment: <name>``. One with ``base: schema`` starts from the
  schema defaults instead of the base file, so no base (laptop) value can leak into it:
  ``config/experiments/paper.yaml`` is such a file.
* **dataset card** (``config/datasets/<id>.yaml``): its ``finetune`` and ``preprocess`` sections apply to that dataset
  only (:meth:`Config.for_dataset`, :func:`region_params`); ``finetune.epochs`` becomes steps at run time.
* **user override files**: any other YAML given with ``--override`` (CLI) or ``--configfile`` (Snakemake).
* **command-line flags**: ``--set key.path=value`` (CLI), ``--config section={key: value}`` (Snakemake) and the dedicated flags of
  a command (``--steps`` ...).

The result is a :class:`Config`: a ``dict`` (validated, defaults filled; ``cfg["finetune"]["roi"]``) with a typed view
(``cfg.finetune.roi``, one frozen dataclass per section from :mod:`voco.settings`). Workflow rules receive a *slice*
(:func:`write_slice`): only the sections the rule reads, in a content-addressed file, so that a changed value re-runs
exactly the jobs that read it and a dry run never rewrites a file a queued job reads.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from voco.errors import ConfigError

REPO_ROOT_MARKERS = ("workflow/Snakefile", "pyproject.toml")

#: layer kinds, lowest precedence first
LAYER_KINDS = ("defaults", "base", "experiment", "card", "override", "flag")
#: keys of an experiment file that describe the layer itself (not configuration values)
LAYER_DIRECTIVES = ("experiment", "base")
#: the sections of a config that a dataset card may override (card key -> config section)
CARD_SECTIONS = ("finetune",)
SLICE_HEADER = "_voco"


def repo_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The repository root: ``$VOCO_ROOT`` if set, else the nearest parent of ``start`` (or cwd) with the markers."""
    if os.environ.get("VOCO_ROOT"):
        return Path(os.environ["VOCO_ROOT"]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if all((p / m).exists() for m in REPO_ROOT_MARKERS):
            return p
    # installed package inside the repository (editable install): src/voco/config.py -> repo
    pkg_root = Path(__file__).resolve().parents[2]
    if all((pkg_root / m).exists() for m in REPO_ROOT_MARKERS):
        return pkg_root
    raise ConfigError(f"cannot find the voco repository root from {here}; set VOCO_ROOT")


def schema_path(name: str = "config", root: Path | None = None) -> Path:
    return (root or repo_root()) / "config" / "schemas" / f"{name}.schema.yaml"


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's exponent floats without a dot (``1e-4``, ``3E5``): YAML 1.1 reads them as
    strings, so a learning rate written ``lr: 1e-4`` (in a file or ``--set finetune.lr=3e-3``) failed validation."""


#: an exponent float that YAML 1.1 leaves a string (``1e-4``, ``3E5``, ``2.5e-4`` parses already)
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with :class:`YamlLoader` (exponent floats without a dot are numbers)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _flag_values(value: Any) -> Any:
    """Snakemake's ``--config`` values with their strings read as YAML scalars, as ``--set`` reads them.

    Snakemake parses ``--config finetune='{steps: 5, lr: 3e-4}'`` with YAML's base loader, which leaves every nested
    value a string ('5', '3e-4'); numbers, booleans and null are restored here (other strings stay strings)."""
    if isinstance(value, Mapping):
        return {k: _flag_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_flag_values(v) for v in value]
    if isinstance(value, str) and value.strip():
        try:
            parsed = yaml_load(value)
        except yaml.YAMLError:
            return value
        return parsed if parsed is None or isinstance(parsed, bool | int | float) else value
    return copy.deepcopy(value)


def default_config_path(root: Path | None = None) -> Path:
    return (root or repo_root()) / "config" / "config.yaml"


def load_yaml(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


@functools.lru_cache(maxsize=8)
def _schema_cached(path: str, mtime_ns: int) -> dict:
    return load_yaml(path)


def load_schema(name: str = "config", root: Path | None = None) -> dict:
    """The JSON schema ``config/schemas/<name>.schema.yaml`` (cached per file version; do not mutate)."""
    p = schema_path(name, root)
    if not p.is_file():
        raise ConfigError(f"{p}: schema not found")
    return _schema_cached(str(p), p.stat().st_mtime_ns)


def plain(obj: Any) -> Any:
    """A deep copy made of plain dicts / lists (for YAML, JSON and weights-only checkpoints)."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return copy.deepcopy(obj)


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Recursively merge ``override`` onto a copy of ``base`` (mappings merge, everything else replaces)."""
    out = plain(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = plain(v)
    return out


def _extend_with_default(validator_class):
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFilling = _extend_with_default(jsonschema.Draft202012Validator)


def validate(instance: Any, schema: dict, source: str, fill_defaults: bool = True, layers: Sequence[Layer] = ()) -> Any:
    """Validate ``instance`` against ``schema`` (filling defaults in place); raise ConfigError naming the key.

    With ``layers``, the error names the layer file that set the offending key (else ``source``)."""
    cls = _DefaultFilling if fill_defaults else jsonschema.Draft202012Validator
    # Fill defaults until stable: nested defaults only appear once their parent exists.
    for _ in range(6):
        before = copy.deepcopy(instance)
        errors = sorted(cls(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
        if errors:
            raise ConfigError(_format_error(errors[0], source, layers))
        if instance == before:
            break
    return instance


def _layer_setting(layers: Sequence[Layer], path: Sequence[Any]) -> Layer | None:
    """The highest layer whose data holds ``path`` (a key path), if any."""
    for layer in reversed(layers):
        node: Any = layer.data
        ok = True
        for part in path:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                ok = False
                break
        if ok:
            return layer
    return None


def _format_error(err: jsonschema.ValidationError, source: str, layers: Sequence[Layer] = ()) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        keys = ", ".join(f"{path}.{k}" if path != "<top level>" else k for k in extra)
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        layer = _layer_setting(layers, [*err.absolute_path, extra[0]]) if extra else None
        where = layer.source if layer else source
        return f"{where}: unknown key {keys} (allowed here: {allowed})"
    layer = _layer_setting(layers, list(err.absolute_path))
    where = layer.source if layer else source
    return f"{where}: key {path}: {err.message}"


# ------------------------------------------------------------------------------------------------ layers
@dataclass(frozen=True)
class Layer:
    """One source of configuration values: its kind (see ``LAYER_KINDS``), where it came from, and its data."""

    kind: str
    source: str
    data: dict

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ConfigError(f"{self.source}: unknown layer kind {self.kind!r}")


def read_layer(path: str | os.PathLike[str], kind: str | None = None) -> Layer:
    """A YAML file as a layer: ``experiment`` when it says ``experiment: <name>``, else a user ``override``."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    if SLICE_HEADER in data and kind != "base":
        raise ConfigError(f"{path}: a rule's resolved config slice can only be given as --config, not as an override")
    if kind is None:
        kind = "experiment" if "experiment" in data else "override"
    if kind == "experiment":
        name = data.get("experiment")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: key experiment: an experiment file names itself (experiment: <name>)")
        if data.get("base", "config") not in ("config", "schema"):
            raise ConfigError(f"{path}: key base: {data['base']!r} must be 'config' (merge onto config/config.yaml) "
                              "or 'schema' (start from the schema defaults, the paper's values)")
    elif "base" in data and kind != "base":
        raise ConfigError(f"{path}: key base: only an experiment file (with experiment: <name>) can set it")
    return Layer(kind, str(path), data)


def parse_set(items: Iterable[str], source: str = "--set") -> dict:
    """``["finetune.steps=5", "model.name=unet"]`` -> nested dict; values parsed as YAML (numbers, lists, null)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected KEY.PATH=VALUE, e.g. finetune.steps=100")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"{source} {item!r}: empty key")
        try:
            parsed = yaml_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{source} {item!r}: value is not valid YAML: {e}") from e
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source} {item!r}: {p} is set to a value and used as a section")
        node[parts[-1]] = parsed
    return out


def _strip_directives(data: Mapping) -> dict:
    return {k: v for k, v in data.items() if k not in LAYER_DIRECTIVES}


def _ordered(layers: Iterable[Layer]) -> list[Layer]:
    return sorted(layers, key=lambda layer: LAYER_KINDS.index(layer.kind))  # stable within a kind


# ------------------------------------------------------------------------------------------------ the config
class Config(dict):
    """A resolved, validated configuration (a ``dict`` with every default filled) plus its provenance.

    * ``cfg["section"]["key"]``: plain dict access (what is recorded in runs is plain data);
    * ``cfg.section.key``: the typed view (:mod:`voco.settings`), built on first use;
    * ``cfg.layers``: the layers it was built from; ``cfg.user``: the merged user-override and flag layers (kept so
      that a dataset card stays below them, :meth:`for_dataset`);
    * ``cfg.rule`` / ``cfg.dataset`` / ``cfg.sections``: set on a rule's slice (only those sections are present;
      reading another one raises ConfigError naming the rule).
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        layers: Sequence[Layer] = (),
        user: Mapping[str, Any] | None = None,
        rule: str | None = None,
        dataset: str | None = None,
        sections: Sequence[str] | None = None,
        source: str = "",
    ) -> None:
        super().__init__(data)
        self.layers = tuple(layers)
        self.user = plain(user or {})
        self.rule = rule
        self.dataset = dataset
        self.sections = tuple(sections) if sections is not None else None
        self.source = source or " + ".join(layer.source for layer in self.layers if layer.kind != "defaults")
        self._typed: dict[str, Any] = {}

    # dict access ------------------------------------------------------------------------------------------
    def __missing__(self, key: str) -> Any:
        raise ConfigError(self._absent(key))

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if self.sections is not None and key not in self and key in section_names():
            raise ConfigError(self._absent(key))
        return super().get(key, default)

    def _absent(self, key: str) -> str:
        if self.sections is not None:
            return (f"config section {key!r} is not part of rule {self.rule or '?'}'s config ({self.source}; it holds "
                    f"{', '.join(self.sections) or 'nothing'}): add it to voco.config.RULE_SECTIONS[{self.rule!r}]")
        return f"{self.source or 'config'}: no section {key!r}"

    # typed view -------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in section_names():
            raise AttributeError(name)
        typed = self.__dict__.setdefault("_typed", {})
        if name not in typed:
            from voco import settings

            value = self[name]
            spec = settings._NESTED.get(("Settings", name))
            typed[name] = spec[0].from_dict(plain(value), name) if spec else value
        return typed[name]

    @property
    def settings(self) -> Any:
        """The whole typed config (:class:`voco.settings.Settings`); not available on a slice."""
        from voco import settings

        if self.sections is not None:
            raise ConfigError(f"rule {self.rule}'s config slice holds only {', '.join(self.sections)}")
        return settings.Settings.from_dict(self.to_dict())

    def to_dict(self) -> dict:
        return plain(dict(self))

    def __reduce__(self):  # pickles (multiprocessing workers) as a plain dict: no custom class in checkpoints
        return (dict, (self.to_dict(),))

    def __deepcopy__(self, memo: dict) -> Config:
        return Config(plain(dict(self)), layers=self.layers, user=self.user, rule=self.rule, dataset=self.dataset,
                      sections=self.sections, source=self.source)

    # derived configs --------------------------------------------------------------------------------------
    def for_dataset(self, card: Mapping[str, Any]) -> Config:
        """This config with ``card``'s sections between the experiment layers and the user's overrides.

        Precedence: ... < experiment < card < user override < flag. A user's ``finetune.steps`` beats a card's
        ``finetune.epochs`` (and the other way round only when the user sets epochs)."""
        if self.dataset is not None:
            if self.dataset != card.get("id"):
                raise ConfigError(f"{self.source}: config resolved for dataset {self.dataset!r}, not {card.get('id')!r}")
            return self
        sections = card_sections(card)
        if self.sections is not None:
            sections = {k: v for k, v in sections.items() if k in self.sections}
        data = deep_merge(deep_merge(dict(self), sections), self.user)
        uft = self.user.get("finetune", {}) if isinstance(self.user.get("finetune"), Mapping) else {}
        if "finetune" in data:
            if "steps" in uft and "epochs" not in uft:
                data["finetune"]["epochs"] = None
        layers = [*self.layers, Layer("card", str(card.get("_path", f"card {card.get('id')}")), sections)]
        schema = load_schema()
        if self.sections is not None:
            schema = _section_schema(schema, [s for s in self.sections])
        validate(data, schema, self.source, layers=_ordered(layers))
        return Config(data, layers=_ordered(layers), user=self.user, rule=self.rule, dataset=str(card.get("id")),
                      sections=self.sections, source=self.source)

    def slice(self, rule: str, dataset: str | None = None, sections: Sequence[str] | None = None) -> Config:
        """Only the sections ``rule`` reads (``RULE_SECTIONS``); the user layer kept for those sections."""
        names = tuple(sections if sections is not None else rule_sections(rule))
        data = {k: plain(self[k]) for k in names}
        user = {k: v for k, v in self.user.items() if k in names}
        return Config(data, layers=self.layers, user=user, rule=rule, dataset=dataset or self.dataset,
                      sections=names, source=self.source)


@functools.lru_cache(maxsize=4)
def _section_names_cached(path: str, mtime_ns: int) -> tuple[str, ...]:
    return tuple(load_yaml(path)["properties"])


def section_names() -> tuple[str, ...]:
    """Top-level keys of the config schema (the sections)."""
    p = schema_path()
    return _section_names_cached(str(p), p.stat().st_mtime_ns)


def _section_schema(schema: dict, names: Sequence[str]) -> dict:
    out = {k: v for k, v in schema.items() if k not in ("properties", "required")}
    out["properties"] = {n: schema["properties"][n] for n in names if n in schema["properties"]}
    return out


def card_sections(card: Mapping[str, Any]) -> dict:
    """The config sections a dataset card overrides (its ``finetune`` section; ``preprocess`` via region_params)."""
    return {k: plain(card[k]) for k in CARD_SECTIONS if isinstance(card.get(k), Mapping) and card[k]}


def build(layers: Sequence[Layer]) -> Config:
    """Merge ``layers`` by precedence, validate against the schema (filling defaults) and type-check."""
    ordered = _ordered(layers)
    experiments = [layer for layer in ordered if layer.kind == "experiment"]
    if any(layer.data.get("base") == "schema" for layer in experiments):
        last = max(i for i, layer in enumerate(experiments) if layer.data.get("base") == "schema")
        ordered = [layer for layer in ordered if layer.kind != "base" and
                   (layer.kind != "experiment" or experiments.index(layer) >= last)]
        experiments = experiments[last:]
    low: dict = {}
    names: list[str] = []
    for layer in ordered:
        if layer.kind in ("base", "experiment"):
            low = deep_merge(low, _strip_directives(layer.data))
            if isinstance(layer.data.get("experiment"), str):
                names.append(layer.data["experiment"])
    user: dict = {}
    for layer in ordered:
        if layer.kind in ("override", "flag"):
            user = deep_merge(user, layer.data)
    if "experiment" in user:
        raise ConfigError(f"{_layer_setting(ordered, ['experiment']).source}: key experiment: only an experiment file "
                          "names an experiment")
    data = deep_merge(low, user)
    data["experiment"] = "+".join(dict.fromkeys(names)) or "default"
    source = " + ".join(layer.source for layer in ordered) or "schema defaults"
    validate(data, load_schema(), source, layers=ordered)
    cfg = Config(data, layers=ordered, user=user, source=source)
    _typecheck(cfg)
    return cfg


def _typecheck(cfg: Config) -> None:
    from voco import settings

    try:
        settings.Settings.from_dict(cfg.to_dict())
    except settings.SettingsError as e:
        raise ConfigError(f"{cfg.source}: {e} (voco/settings.py is out of date with the schema: "
                          "python -m voco.settings_codegen > src/voco/settings.py)") from e


def resolve(
    config: str | os.PathLike[str] | None = None,
    overrides: Sequence[str | os.PathLike[str]] = (),
    sets: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """The resolved config of ``config`` (default ``config/config.yaml``) + override files + ``--set`` flags.

    ``config`` may also be a rule's slice (written by :func:`write_slice`): it is read back as it was resolved, and
    overrides / flags apply on top of its sections."""
    path = Path(config) if config else default_config_path()
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys")
    if SLICE_HEADER in raw:
        return _from_slice(raw, path, overrides, sets, extra)
    layers = [Layer("base", str(path), raw)]
    layers += [read_layer(ov) for ov in overrides]
    if extra:
        layers.append(Layer("flag", "command-line flags", plain(extra)))
    if sets:
        layers.append(Layer("flag", "--set", parse_set(sets)))
    return build(layers)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str | os.PathLike[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> Config:
    """Compatibility name of :func:`resolve` (``path`` = the base file or a rule's slice)."""
    return resolve(path, overrides or (), sets, extra)


# ------------------------------------------------------------------------------------------------ slices
#: the config sections each workflow rule (= CLI subcommand) reads. A slice holds exactly these, so a change elsewhere
#: never re-runs the rule, and reading a section that is not listed fails loudly (tests run every rule).
RULE_SECTIONS: dict[str, tuple[str, ...]] = {
    "synth": ("synth", "cards_dir"),
    "download": ("download", "paths", "cards_dir"),
    "link": ("download", "paths", "cards_dir"),
    "convert": ("cards_dir",),
    "preprocess": ("preprocess", "cards_dir"),
    "leakage_index": (),
    "audit_leakage_dataset": ("audit", "cards_dir"),
    "audit_leakage": (),
    "vocomni": ("vocomni", "preprocess", "model", "paths", "cards_dir"),
    "pretrain_ssl": ("pretrain", "model"),
    "pretrain_stage1": ("pretrain", "model", "preprocess", "vocomni", "paths", "cards_dir"),
    "pretrain_stage2": ("pretrain", "model", "preprocess", "vocomni", "paths", "cards_dir"),
    "pretrain_suprem": ("pretrain", "model", "preprocess", "vocomni", "paths", "cards_dir"),
    "pseudolabel": ("pretrain", "model", "preprocess", "vocomni", "datasets", "paths", "cards_dir"),
    "pseudolabel_merge": ("pretrain", "model", "preprocess", "vocomni", "datasets", "paths", "cards_dir"),
    "finetune": ("finetune", "model", "paths", "cards_dir"),
    "evaluate": ("evaluate",),
    "evaluate_dataset": ("report",),
    "report": ("report",),
    "predict": ("evaluate",),
}


#: the dataset-card keys each per-dataset rule reads; they are part of its slice's content (hence its hash), so that a
#: card edit re-runs exactly the jobs it affects (a new description re-runs nothing, a new spacing re-preprocesses).
RULE_CARD_KEYS: dict[str, tuple[str, ...]] = {
    "synth": ("source", "region", "labels", "task"),
    "download": ("source", "format", "expected_count"),
    "link": ("source", "format"),
    "convert": ("source", "format", "labels", "modality", "task", "region", "role"),
    "preprocess": ("region", "modality", "labels", "task", "preprocess", "split", "role", "vocomni_map"),
    "pseudolabel": ("region", "role"),
    "pseudolabel_merge": ("region", "role"),
    "finetune": ("task", "labels", "modality", "split", "finetune", "region"),
    "audit_leakage_dataset": ("task", "labels", "split"),
    "evaluate": ("task", "labels", "split"),
    "evaluate_dataset": ("task", "labels"),
}


def rule_sections(rule: str) -> tuple[str, ...]:
    if rule not in RULE_SECTIONS:
        raise ConfigError(f"no config sections declared for rule {rule!r} (voco.config.RULE_SECTIONS)")
    return RULE_SECTIONS[rule]


def slice_document(cfg: Config) -> dict:
    """The YAML document of a slice: its header (rule, dataset, sections, user layer) and its sections."""
    if cfg.sections is None:
        raise ConfigError("slice_document needs a slice (Config.slice)")
    header = {"rule": cfg.rule, "dataset": cfg.dataset, "sections": list(cfg.sections), "user": plain(cfg.user)}
    return {SLICE_HEADER: header, **{k: plain(cfg[k]) for k in cfg.sections}}


def slice_digest(doc: Mapping[str, Any]) -> str:
    text = yaml.safe_dump(plain(doc), sort_keys=True, default_flow_style=None)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_slice(cfg: Config, rule: str, dataset: str | None = None, folder: str | os.PathLike[str] = ".") -> Path:
    """Write ``cfg``'s slice for ``rule`` (card-resolved for ``dataset``) to ``folder/<rule>[-<dataset>]-<hash>.yaml``.

    Content-addressed and written once: the same values give the same path (so Snakemake's params trigger re-runs a
    job exactly when its values change) and an existing file is never rewritten (queued or running jobs read it)."""
    sl = cfg.slice(rule)
    card_part: dict = {}
    if dataset is not None:
        card = load_card(dataset, cfg["cards_dir"])
        sl = sl.for_dataset(card) if "cards_dir" in sl else sl
        sl.dataset = dataset
        card_part = {k: plain(card[k]) for k in RULE_CARD_KEYS.get(rule, ()) if k in card}
    doc = slice_document(sl)
    if card_part:
        doc[SLICE_HEADER]["card"] = card_part
    name = f"{rule}-{dataset}-{slice_digest(doc)}.yaml" if dataset else f"{rule}-{slice_digest(doc)}.yaml"
    path = Path(folder) / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        from voco.io import atomic_path

        text = ("# voco: the resolved config of one workflow rule (written once; its name is the hash of its content)\n"
                + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


def _from_slice(raw: dict, path: Path, overrides: Sequence, sets: Sequence[str], extra: Mapping | None) -> Config:
    header = raw[SLICE_HEADER]
    if not isinstance(header, dict) or "sections" not in header:
        raise ConfigError(f"{path}: malformed config slice header {SLICE_HEADER}")
    names = list(header["sections"])
    data = {k: v for k, v in raw.items() if k != SLICE_HEADER}
    if sorted(data) != sorted(names):
        raise ConfigError(f"{path}: slice sections {sorted(data)} differ from its header {sorted(names)}")
    user = dict(header.get("user") or {})
    layers = [Layer("base", str(path), data)]
    more = [read_layer(ov) for ov in overrides]
    if extra:
        more.append(Layer("flag", "command-line flags", plain(extra)))
    if sets:
        more.append(Layer("flag", "--set", parse_set(sets)))
    for layer in more:
        if layer.kind == "experiment":
            raise ConfigError(f"{layer.source}: an experiment file cannot apply on top of a rule's resolved slice")
        stray = sorted(set(layer.data) - set(names))
        if stray:
            raise ConfigError(f"{layer.source}: sets {', '.join(stray)}, which rule {header.get('rule')}'s slice "
                              f"{path} does not hold ({', '.join(names)})")
        data = deep_merge(data, layer.data)
        user = deep_merge(user, layer.data)
    schema = _section_schema(load_schema(), names)
    validate(data, schema, str(path), layers=[*layers, *more])
    return Config(data, layers=[*layers, *more], user=user, rule=header.get("rule"), dataset=header.get("dataset"),
                  sections=names, source=str(path))


# ------------------------------------------------------------------------------------------------ CLI helpers
def add_config_arguments(parser: Any) -> None:
    """``--config``, ``--override`` and ``--set``: the config options every command shares."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="base config or a rule's resolved slice (default: config/config.yaml)")
    parser.add_argument("--override", action="append", default=[], metavar="FILE",
                        help="experiment file (with `experiment: <name>`) or user override file; repeatable")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                        help="command-line value above every file, e.g. --set finetune.steps=100; repeatable")


def config_from_args(args: Any, extra: Mapping[str, Any] | None = None) -> Config:
    """The resolved config of a command's ``--config`` / ``--override`` / ``--set`` (+ its own flags as ``extra``)."""
    return resolve(getattr(args, "config", None), getattr(args, "override", None) or (),
                   getattr(args, "set_values", None) or (), extra)


# ------------------------------------------------------------------------------------------------ cards
def cards_folder(cards_dir: str | os.PathLike[str] | None = None) -> Path:
    root = repo_root()
    cards = Path(cards_dir) if cards_dir else root / "config" / "datasets"
    return cards if cards.is_absolute() else root / cards


def load_card(dataset_id: str, cards_dir: str | os.PathLike[str] | None = None) -> dict:
    """Load and validate the dataset card ``<cards_dir>/<dataset_id>.yaml`` (defaults filled in).

    Every key is checked: the schema, and the ``finetune`` section against the config's ``finetune`` keys (so a
    misspelt key fails here, naming the card, not inside a fine-tuning job)."""
    from voco.ids import id_problem

    problem = id_problem(dataset_id)
    if problem is not None:  # a dataset id names files: never let it be a path
        raise ConfigError(f"dataset id {str(dataset_id)[:80]!r} {problem}: use the card's id (letters, digits, '_')")
    cards = cards_folder(cards_dir)
    path = cards / f"{dataset_id}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in cards.glob("*.yaml")))
        raise ConfigError(f"dataset card {path} not found (known datasets: {known})")
    card = load_yaml(path)
    if not isinstance(card, dict):
        raise ConfigError(f"{path}: a dataset card must be a mapping of keys")
    validate(card, load_schema("dataset"), str(path))
    if card["id"] != dataset_id:
        raise ConfigError(f"{path}: key id: {card['id']!r} does not match the file name {dataset_id!r}")
    ft = card.get("finetune") or {}
    if ft:
        section = load_schema()["properties"]["finetune"]
        try:
            validate(copy.deepcopy(ft), section, str(path), fill_defaults=False)
        except ConfigError as e:
            raise ConfigError(str(e).replace(f"{path}: key ", f"{path}: key finetune.").replace(
                f"{path}: unknown key ", f"{path}: unknown key finetune.")) from e
    card.setdefault("annotated", [n for k, n in card.get("labels", {}).items() if str(k) != "0"])
    card["_path"] = str(path)
    return card


def region_params(cfg: Mapping, card: Mapping) -> dict:
    """Effective pre-processing parameters of a dataset (spacing, window, roi, storage dtype).

    Precedence: the config's region defaults (schema < base < experiment) < the card's ``preprocess`` < the user's
    override of ``preprocess.regions.<region>`` / ``preprocess.roi`` < flags."""
    region = card["region"]
    regions = cfg["preprocess"]["regions"]
    if region not in regions:
        raise ConfigError(f"dataset {card['id']}: region {region!r} has no defaults in preprocess.regions")
    params = {"spacing": list(regions[region]["spacing"]), "window": list(regions[region]["window"])}
    params["roi"] = list(cfg["preprocess"]["roi"])
    params.update(plain(card.get("preprocess") or {}))
    user = getattr(cfg, "user", {}) or {}
    upre = user.get("preprocess") or {}
    uregion = (upre.get("regions") or {}).get(region) or {}
    for key in ("spacing", "window"):
        if key in uregion:
            params[key] = list(uregion[key])
    if "roi" in upre:
        params["roi"] = list(upre["roi"])
    params["storage_dtype"] = cfg["preprocess"]["storage_dtype"]
    return params


# ------------------------------------------------------------------------------------------------ the workflow
def resolve_workflow(
    base: str | os.PathLike[str],
    configfiles: Sequence[str | os.PathLike[str]] = (),
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """The config of a Snakemake run, by the same layer rule as the CLI.

    Args:
        base: the Snakefile's ``configfile:`` (config/config.yaml).
        configfiles: ``--configfile`` files (command line or profile), in order; the base file among them is skipped,
            the others are experiment files (``experiment: <name>``) or user overrides.
        flags: Snakemake's ``--config`` entries (``finetune={steps: 5}``; a dotted key works from Python, the CLI refuses it).
    """
    base = Path(base).resolve()
    layers = [Layer("base", str(base), load_yaml(base))]
    for f in configfiles:
        if Path(f).resolve() == base:
            continue
        layers.append(read_layer(f))
    if flags:
        nested: dict = {}
        for key, value in dict(flags).items():
            node = nested
            parts = str(key).split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = _flag_values(value)
        layers.append(Layer("flag", "snakemake --config", nested))
    return build(layers)
