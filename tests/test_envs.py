"""Software environments: the conda env (envs/voco.yaml) and the Apptainer definition (containers/voco.def).

No conda client or apptainer binary can be installed on the CI machine, so these are static checks: the pins agree
with pyproject.toml, the definition has a well-formed header and known sections, every file it copies exists, and the
rules' `conda:` / `container:` directives point at these files.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILE = REPO / "envs" / "voco.yaml"
DEF_FILE = REPO / "containers" / "voco.def"

# Sections an Apptainer definition may have (apptainer docs, "Definition Files").
KNOWN_SECTIONS = {"setup", "files", "environment", "post", "runscript", "startscript", "test", "labels", "help",
                  "arguments", "app", "appinstall", "appenv", "apprun", "appfiles", "applabels", "apphelp", "apptest"}
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9_,-]+\])?\s*==\s*([A-Za-z0-9.+!-]+)\s*$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines: list[str], where: str) -> dict[str, tuple[str, str]]:
    """'pkg[extra]==1.2' strings -> {normalised name: (extras, version)}; anything unpinned is an error."""
    pins = {}
    for line in lines:
        m = _REQ.match(line)
        assert m, f"{where}: {line!r} is not pinned as name==version"
        name = _norm(m.group(1))
        assert name not in pins, f"{where}: {name} pinned twice"
        pins[name] = (m.group(2) or "", m.group(3))
    return pins


def pyproject_pins() -> dict[str, tuple[str, str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return parse_pins(project["dependencies"], "pyproject.toml")


def env_pins() -> dict[str, tuple[str, str]]:
    env = yaml.safe_load(ENV_FILE.read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, f"{ENV_FILE}: expected one pip: section"
    return parse_pins(pip[0], str(ENV_FILE))


def parse_def(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Split an Apptainer definition into its header (key: value lines before the first %section) and sections."""
    header: dict[str, str] = {}
    sections: dict[str, str] = {}
    current = None
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^%(\w+)(\s.*)?$", line)
        if m:
            current = m.group(1).lower()
            assert current in KNOWN_SECTIONS, f"line {lineno}: unknown section %{current}"
            assert current not in sections, f"line {lineno}: section %{current} repeated"
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            assert sep and key.strip() and value.strip(), f"line {lineno}: header line {line!r} is not 'Key: value'"
            header[key.strip().lower()] = value.strip()
    return header, sections


def def_pins(post: str) -> dict[str, tuple[str, str]]:
    """Quoted requirement strings of the `pip install` in %post (the package itself is installed with --no-deps)."""
    return parse_pins(re.findall(r'"([^"\s]+==[^"\s]+)"', post), str(DEF_FILE))


def test_conda_env_pins_match_pyproject():
    assert env_pins() == pyproject_pins()


def test_conda_env_python_matches_requires_python():
    env = yaml.safe_load(ENV_FILE.read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python == ["python=3.11"], python
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.11" in requires and "<3.12" in requires


def test_conda_post_deploy_installs_the_package():
    script = ENV_FILE.with_name("voco.post-deploy.sh")  # Snakemake runs <env>.post-deploy.sh after building the env
    assert script.is_file() and script.stat().st_mode & 0o111, f"{script} missing or not executable"
    assert re.search(r"pip install --no-deps -e ", script.read_text())


def test_definition_parses():
    header, sections = parse_def(DEF_FILE.read_text())
    assert header["bootstrap"] == "docker"
    image = header["from"]
    repo, _, tag = image.partition(":")
    assert repo == "pytorch/pytorch" and tag and tag != "latest", f"base must be a pinned CUDA PyTorch tag: {image}"
    assert "cuda" in tag and "cudnn" in tag, image
    for required in ("files", "post", "environment", "runscript", "test", "labels", "help"):
        assert sections.get(required, "").strip(), f"section %{required} missing or empty"


def test_definition_pins_match_pyproject_and_base_image():
    header, sections = parse_def(DEF_FILE.read_text())
    pins = pyproject_pins()
    assert def_pins(sections["post"]) == pins
    torch_version = pins["torch"][1]
    assert header["from"].split(":")[1].startswith(torch_version + "-"), "base image torch differs from the torch pin"
    assert "--no-deps /opt/voco" in sections["post"], "the package must be installed without re-resolving the pins"


def test_definition_copies_files_that_exist():
    _, sections = parse_def(DEF_FILE.read_text())
    lines = [line.strip() for line in sections["files"].splitlines()]
    entries = [line.split() for line in lines if line and not line.startswith("#")]
    assert entries
    for entry in entries:
        assert len(entry) == 2, f"%files line {entry} is not 'source destination'"
        src, dest = entry
        assert (REPO / src).exists(), f"%files source {src} does not exist (the build runs from the repository root)"
        assert dest.startswith("/opt/voco/")
    copied = {e[0] for e in entries}
    assert {"pyproject.toml", "src"} <= copied
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("readme")
    if readme:  # setuptools needs the readme named in pyproject to build the package
        assert readme in copied


@pytest.mark.parametrize("smk", sorted((REPO / "rules").glob("*.smk")), ids=lambda p: p.name)
def test_rules_point_at_these_environments(smk):
    """common.smk's CONDA_ENV / CONTAINER name these files (relative to the rules folder / the working directory)."""
    common = (REPO / "rules" / "common.smk").read_text()
    conda = re.search(r'^CONDA_ENV\s*=\s*"([^"]+)"', common, re.M)
    container = re.search(r'^CONTAINER\s*=\s*"([^"]+)"', common, re.M)
    assert conda and (REPO / "rules" / conda.group(1)).resolve() == ENV_FILE
    assert container and Path(container.group(1)).with_suffix(".def") == DEF_FILE.relative_to(REPO)
    text = smk.read_text()
    n_rules = len(re.findall(r"^rule \w+:", text, re.M))
    n_shell = len(re.findall(r"^\s+shell:", text, re.M))
    assert len(re.findall(r"^\s+conda:\s+CONDA_ENV\b", text, re.M)) == n_shell, f"{smk.name}: a rule lacks conda"
    assert len(re.findall(r"^\s+container:\s+CONTAINER\b", text, re.M)) == n_shell, f"{smk.name}: no container"
    assert n_shell <= n_rules
