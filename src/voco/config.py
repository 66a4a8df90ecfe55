"""Typed access to the validated configuration and to dataset cards.

The same JSON Schemas (``config/schemas/*.schema.yaml``) validate the config in Snakemake and here. Defaults declared in
the schema are filled in; unknown keys are rejected and the error names the key path and the file.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from voco.errors import ConfigError

REPO_ROOT_MARKERS = ("workflow/Snakefile", "pyproject.toml")


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


def load_yaml(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` onto a copy of ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
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


def validate(instance: Any, schema: dict, source: str, fill_defaults: bool = True) -> Any:
    """Validate ``instance`` against ``schema`` (filling defaults in place); raise ConfigError naming the key."""
    cls = _DefaultFilling if fill_defaults else jsonschema.Draft202012Validator
    # Fill defaults until stable: nested defaults only appear once their parent exists.
    for _ in range(4):
        before = copy.deepcopy(instance)
        errors = sorted(cls(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
        if errors:
            raise ConfigError(_format_error(errors[0], source))
        if instance == before:
            break
    return instance


def _format_error(err: jsonschema.ValidationError, source: str) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        keys = ", ".join(f"{path}.{k}" if path != "<top level>" else k for k in extra)
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        return f"{source}: unknown key {keys} (allowed here: {allowed})"
    return f"{source}: key {path}: {err.message}"


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str | os.PathLike[str]] | None = None,
    extra: dict | None = None,
) -> dict:
    """Load ``config/config.yaml`` (or ``path``), merge override files and ``extra``, validate, fill defaults.

    The workflow passes its resolved config (overrides merged) as ``path``: rules call ``voco ... --config``.
    """
    root = repo_root()
    path = Path(path) if path else root / "config" / "config.yaml"
    cfg = load_yaml(path)
    sources = [str(path)]
    for ov in overrides or []:
        cfg = deep_merge(cfg, load_yaml(ov))
        sources.append(str(ov))
    if extra:
        cfg = deep_merge(cfg, extra)
    schema = load_yaml(schema_path("config", root))
    return validate(cfg, schema, " + ".join(sources))


def load_card(dataset_id: str, cards_dir: str | os.PathLike[str] | None = None) -> dict:
    """Load and validate the dataset card ``<cards_dir>/<dataset_id>.yaml`` (defaults filled in)."""
    root = repo_root()
    cards = Path(cards_dir) if cards_dir else root / "config" / "datasets"
    if not cards.is_absolute():
        cards = root / cards
    path = cards / f"{dataset_id}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in cards.glob("*.yaml")))
        raise ConfigError(f"dataset card {path} not found (known datasets: {known})")
    card = load_yaml(path)
    validate(card, load_yaml(schema_path("dataset", root)), str(path))
    if card["id"] != dataset_id:
        raise ConfigError(f"{path}: key id: {card['id']!r} does not match the file name {dataset_id!r}")
    card.setdefault("annotated", [n for k, n in card.get("labels", {}).items() if str(k) != "0"])
    return card


def region_params(cfg: dict, card: dict) -> dict:
    """Effective pre-processing parameters for a dataset: region defaults, then the card's overrides."""
    region = card["region"]
    regions = cfg["preprocess"]["regions"]
    if region not in regions:
        raise ConfigError(f"dataset {card['id']}: region {region!r} has no defaults in preprocess.regions")
    params = {"spacing": list(regions[region]["spacing"]), "window": list(regions[region]["window"])}
    params["roi"] = list(cfg["preprocess"]["roi"])
    params.update(copy.deepcopy(card.get("preprocess", {})))
    params["storage_dtype"] = cfg["preprocess"]["storage_dtype"]
    return params
