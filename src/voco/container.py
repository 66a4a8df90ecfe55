"""The Apptainer image of the workflow, through spython (the ``apptainer-python`` package, published as ``spython``).

``check``: spython's own Singularity/Apptainer recipe parser reads ``containers/voco.def``; on top of what it parses
(spython checks no content) we check that the base image is pinned, every ``%files`` source exists, the ``pip install``
pins in ``%post`` equal ``pyproject.toml``'s and the base image carries the pinned torch.

``build``: check, then spython's client runs ``singularity build <image> <definition>`` (Apptainer installs the
``singularity`` command as a compatibility link). Where neither ``apptainer`` nor ``singularity`` is installed the
build stops with a message that says so and what to run on a machine that has it.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voco.errors import ContainerError

DEFAULT_DEF = Path("containers/voco.def")
DEFAULT_SIF = Path("containers/voco.sif")
_PIN = re.compile(r"""["']?([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9_,-]+\])?==([A-Za-z0-9.+!-]+)["']?""")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class CheckResult:
    """What ``check`` found: the parsed recipe's essentials and the problems (empty = fine)."""

    definition: Path
    base_image: str = ""
    files: list[tuple[str, str]] = field(default_factory=list)
    pins: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def parse(definition: str | os.PathLike[str]) -> Any:
    """spython's parsed recipe of an Apptainer / Singularity definition file."""
    from spython.main.parse.parsers import SingularityParser

    definition = Path(definition)
    if not definition.is_file():
        raise ContainerError(f"{definition}: definition file not found")
    try:
        recipes = SingularityParser(str(definition)).recipe
    except Exception as e:  # noqa: BLE001 - spython raises plain exceptions / exits on bad input
        raise ContainerError(f"{definition}: spython cannot parse it ({type(e).__name__}: {e})") from e
    if not recipes:
        raise ContainerError(f"{definition}: spython found no recipe in it")
    return next(iter(recipes.values()))


def project_pins(root: Path) -> dict[str, str]:
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        m = _PIN.fullmatch(d.strip())
        if m:
            out[_norm(m.group(1))] = m.group(3)
    return out


def check(definition: str | os.PathLike[str] = DEFAULT_DEF, root: str | os.PathLike[str] | None = None) -> CheckResult:
    """Parse ``definition`` with spython and check it against the repository at ``root`` (default: its repo root)."""
    from voco.config import repo_root

    definition = Path(definition)
    root = Path(root) if root else repo_root(definition.resolve().parent)
    recipe = parse(definition)
    res = CheckResult(definition)
    text = definition.read_text()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    if not re.fullmatch(r"(?i)bootstrap:\s*(docker|docker-daemon|oras|library|localimage)", first):
        res.problems.append(f"{definition}: the header must start with 'Bootstrap: docker' (found {first!r})")
    res.base_image = str(recipe.fromHeader or "")
    base = res.base_image
    if not base:
        res.problems.append(f"{definition}: no 'From:' base image")
    elif ":" not in base.rsplit("/", 1)[-1] or base.endswith(":latest"):
        res.problems.append(f"{definition}: base image {base!r} is not pinned to a tag (e.g. pytorch/pytorch:2.13.0-...)")
    for line in recipe.files:
        parts = str(line).split()
        if not parts:
            continue
        src, dest = parts[0], (parts[1] if len(parts) > 1 else parts[0])
        res.files.append((src, dest))
        if not (root / src).exists():
            res.problems.append(f"{definition}: %files source {src!r} does not exist under {root}")
    install = " ".join(recipe.install)
    for m in _PIN.finditer(install):
        res.pins[_norm(m.group(1))] = m.group(3)
    wanted = project_pins(root)
    if not res.pins:
        res.problems.append(f"{definition}: %post installs no pinned package (pip install \"name==version\" ...)")
    else:
        for name, ver in sorted(wanted.items()):
            if res.pins.get(name) != ver:
                res.problems.append(f"{definition}: %post pins {name}=={res.pins.get(name, '<missing>')}, "
                                    f"pyproject.toml pins {name}=={ver}")
        for name in sorted(set(res.pins) - set(wanted)):
            res.problems.append(f"{definition}: %post pins {name}, which pyproject.toml does not list")
    torch_pin = wanted.get("torch")
    m = re.search(r"pytorch:(\d+\.\d+\.\d+)", base)
    if torch_pin and m and m.group(1) != torch_pin.split("+")[0]:
        res.problems.append(f"{definition}: base image carries torch {m.group(1)}, pyproject.toml pins {torch_pin}")
    if "voco" not in str(recipe.cmd or ""):
        res.problems.append(f"{definition}: %runscript does not run voco")
    return res


def builder() -> str | None:
    """The container tool on PATH: ``singularity`` (what spython drives; Apptainer's compatibility name),
    ``apptainer`` (present without the compatibility link), or None."""
    for tool in ("singularity", "apptainer"):
        if shutil.which(tool):
            return tool
    return None


def build(definition: str | os.PathLike[str] = DEFAULT_DEF, image: str | os.PathLike[str] = DEFAULT_SIF,
          force: bool = False, fakeroot: bool = False, root: str | os.PathLike[str] | None = None) -> Path:
    """Check ``definition`` and build ``image`` from it with spython's client (run from the repository root, where the
    ``%files`` paths are relative)."""
    res = check(definition, root)
    if not res.ok:
        raise ContainerError("; ".join(res.problems))
    tool = builder()
    definition, image = Path(definition).resolve(), Path(image).resolve()
    if tool is None:
        raise ContainerError(
            f"{definition} is valid (spython), but neither apptainer nor singularity is installed on this machine, so "
            f"{image.name} cannot be built here. Install Apptainer (https://apptainer.org/docs/admin/main/"
            f"installation.html) and run `voco container build`, or build on a machine that has it and copy "
            f"the image to {image}; `snakemake --software-deployment-method apptainer` uses it from there")
    if tool == "apptainer":
        raise ContainerError(
            "apptainer is installed without its `singularity` compatibility command, which spython drives: add it "
            "(e.g. `ln -s $(command -v apptainer) ~/.local/bin/singularity`) and run `voco container build` again, "
            f"or run `apptainer build {image} {definition}` from the repository root")
    if image.exists() and not force:
        raise ContainerError(f"{image} exists; pass --force to rebuild it")
    from spython.main import Client

    image.parent.mkdir(parents=True, exist_ok=True)
    options = ["--fakeroot"] if fakeroot else []
    cwd = os.getcwd()
    try:
        os.chdir(Path(root) if root else definition.parent.parent)
        out = Client.build(recipe=str(definition), image=str(image), sudo=False, force=force, options=options,
                           quiet=False)
    finally:
        os.chdir(cwd)
    if not out or not image.is_file():
        raise ContainerError(f"singularity build {image} {definition} did not produce {image} (see its output above)")
    return image
