"""Generate :mod:`voco.settings` (one dataclass per config section) from ``config/schemas/config.schema.yaml``.

The schema is the single source of truth for keys, types, defaults and descriptions; the dataclasses are its typed
view. ``python -m voco.settings_codegen > src/voco/settings.py`` regenerates them; a test fails when the committed
file and the schema drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HEADER = '''"""Typed view of the resolved configuration: one frozen dataclass per config section.

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

'''

SCALAR = {"integer": "int", "number": "float", "boolean": "bool", "string": "str"}


def camel(path: list[str]) -> str:
    return "".join(p.replace("_", " ").title().replace(" ", "") for p in path) or "Settings"


class Gen:
    def __init__(self, schema: dict) -> None:
        self.schema = schema
        self.classes: list[str] = []
        self.nested: list[tuple[str, str, str, str]] = []

    def ref(self, node: dict) -> dict:
        if "$ref" in node:
            name = node["$ref"].split("/")[-1]
            merged = dict(self.schema["$defs"][name])
            merged.update({k: v for k, v in node.items() if k != "$ref"})
            return merged
        return node

    def type_of(self, node: dict, path: list[str]) -> str:
        node = self.ref(node)
        if "enum" in node and "type" not in node:
            vals = [v for v in node["enum"]]
            return "Literal[" + ", ".join(repr(v) for v in vals) + "]"
        t = node.get("type")
        if isinstance(t, list):
            inner = [x for x in t if x != "null"]
            base = self.type_of({**node, "type": inner[0]}, path) if len(inner) == 1 else "Any"
            return f"{base} | None" if "null" in t else base
        if t == "object":
            add = node.get("additionalProperties")
            if "properties" in node and not isinstance(add, dict):
                return self.section(node, path)
            if isinstance(add, dict):
                add = self.ref(add)
                if add.get("properties"):
                    cls = self.section(add, path[:-1] + [path[-1] + "_entry"])
                    return f"dict[str, {cls}]"
                return f"dict[str, {self.type_of(add, path + ['value'])}]"
            return "dict[str, Any]"
        if t == "array":
            items = node.get("items", {})
            items = self.ref(items) if isinstance(items, dict) else {}
            if items.get("type") == "object" and "properties" in items:
                cls = self.section(items, path[:-1] + [path[-1] + "_item"])
                return f"list[{cls}]"
            return "list[Any]"
        if "enum" in node and t == "string":
            return "Literal[" + ", ".join(repr(v) for v in node["enum"]) + "]"
        return SCALAR.get(t, "Any")

    def section(self, node: dict, path: list[str]) -> str:
        name = camel(path)
        lines = [
            "@dataclass(frozen=True)",
            f"class {name}:",
            f'    """{(node.get("description") or "/".join(path) or "the whole configuration").strip()}"""',
            "",
        ]
        for key, sub in node["properties"].items():
            sub_r = self.ref(sub)
            typ = self.type_of(sub, path + [key])
            if sub_r.get("type") == "object" and "properties" in sub_r and not isinstance(
                sub_r.get("additionalProperties"), dict
            ):
                self.nested.append((name, key, typ, "one"))
            elif typ.startswith("list[") and typ[5:-1] in self.class_names():
                self.nested.append((name, key, typ[5:-1], "list"))
            elif typ.startswith("dict[str, ") and typ[10:-1] in self.class_names():
                self.nested.append((name, key, typ[10:-1], "map"))
            lines.append(f"    {key}: {typ}")
        lines.append("")
        lines.append("    @classmethod")
        lines.append(f"    def from_dict(cls, data: dict[str, Any], where: str = {'/'.join(path) or 'config'!r}) -> {name}:")
        lines.append("        return _build(cls, data, where)")
        self.classes.append("\n".join(lines))
        return name

    def class_names(self) -> set[str]:
        return {c.split("class ", 1)[1].split(":", 1)[0] for c in self.classes}


def generate(schema_file: str | Path) -> str:
    schema = yaml.safe_load(Path(schema_file).read_text())
    g = Gen(schema)
    g.section(schema, [])
    out = [HEADER]
    out.extend(c + "\n\n" for c in g.classes)
    out.append("_NESTED: dict[tuple[str, str], tuple[type, str]] = {\n")
    for cls, key, typ, kind in g.nested:
        out.append(f"    ({cls!r}, {key!r}): ({typ}, {kind!r}),\n")
    out.append("}\n")
    text = "".join(out)
    return text.replace("\n\n\n\n", "\n\n\n").rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = Path(__file__).resolve().parents[2]
    schema = Path(argv[0]) if argv else root / "config" / "schemas" / "config.schema.yaml"
    sys.stdout.write(generate(schema))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
