"""``voco container check|build`` through spython. No apptainer binary can be installed here (MACHINE-NOTES.md), so:
the shipped definition is read with spython's own parser and checked; edited copies fail with the problem named;
`build` says clearly that apptainer is missing; and with a *recording shim* named `singularity` on PATH (a stand-in
for the real binary, which only writes down its command line and creates the image file) spython drives
`singularity build <image> <definition>` from the repository root."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from voco.cli import main as voco
from voco.container import build, check, parse
from voco.errors import ContainerError

REPO = Path(__file__).resolve().parents[1]
DEF = REPO / "containers" / "voco.def"


def test_spython_parses_the_shipped_definition():
    recipe = parse(DEF)
    assert recipe.fromHeader.startswith("pytorch/pytorch:2.13.0")
    assert any("voco" in line for line in recipe.install)
    res = check(DEF, REPO)
    assert res.ok, res.problems
    assert ("src", "/opt/voco/src") in res.files and res.pins["torch"] == "2.13.0" and res.pins["spython"]


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("From: pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime", "From: pytorch/pytorch:latest"),
     "not pinned"),
    (lambda t: t.replace("    src /opt/voco/src", "    srcs /opt/voco/src"), "'srcs' does not exist"),
    (lambda t: t.replace('"numpy==2.4.6"', '"numpy==2.0.0"'), "numpy==2.0.0, pyproject.toml pins numpy==2.4.6"),
])
def test_edited_definitions_fail_with_the_problem_named(tmp_path, edit, problem):
    bad = tmp_path / "voco.def"
    bad.write_text(edit(DEF.read_text()))
    res = check(bad, REPO)
    assert not res.ok and any(problem in p for p in res.problems), res.problems


def test_spython_parse_errors_name_the_file(tmp_path):
    bad = tmp_path / "voco.def"
    bad.write_text(DEF.read_text().replace("Bootstrap: docker", "Bootstrap: nonsense"))
    with pytest.raises(ContainerError, match=f"{bad}: spython cannot parse it"):
        check(bad, REPO)
    with pytest.raises(ContainerError, match="definition file not found"):
        check(tmp_path / "missing.def", REPO)


def test_build_without_apptainer_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apptainer / singularity
    assert voco(["container", "build", "--out", str(tmp_path / "x.sif")]) == 2
    err = capsys.readouterr().err
    assert "neither apptainer nor singularity is installed" in err and "is valid (spython)" in err


def test_build_drives_singularity_build_through_spython(monkeypatch, tmp_path):
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    log = tmp_path / "calls.txt"
    shim = shim_dir / "singularity"  # recording shim, not apptainer: writes its argv and the image file
    shim.write_text(f"""#!/bin/sh
echo "$PWD|$*" >> {log}
if [ "$1" = "--version" ]; then echo "singularity-ce version 4.0 (shim)"; exit 0; fi
for last; do :; done
for a in "$@"; do case "$a" in *.sif) touch "$a";; esac; done
""")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{shim_dir}{os.pathsep}{os.environ['PATH']}")
    image = tmp_path / "out" / "voco.sif"
    assert build(DEF, image, root=REPO) == image.resolve() and image.is_file()
    calls = [line.split("|", 1) for line in log.read_text().splitlines()]
    builds = [(cwd, args) for cwd, args in calls if " build " in f" {args} "]
    assert builds == [(str(REPO), f"build {image.resolve()} {DEF.resolve()}")]
    with pytest.raises(ContainerError, match="exists; pass --force"):
        build(DEF, image, root=REPO)
    assert shutil.which("singularity") == str(shim)
