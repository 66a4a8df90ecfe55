"""DVC over the workflow: a temp copy of the repository (git init, the shipped .dvc/config and the generated dvc.yaml).

* the shipped DVC settings (hardlink cache, the default remote beside the repository);
* stages follow the config's dataset lists; the committed dvc.yaml is what `voco dvc-index` generates;
* every dependency the pipeline makes is the output of some stage (stage keys and rule paths agree).

The real `dvc repro` runs (adopting a finished `make run`, a clean clone after `dvc pull`) are in
tests/test_default_dag.py, on the shipped default config.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATASET = "phantom_tumour"  # the smallest downstream phantom of the default config (10 cases)
CHAIN = ["raw", "convert", "preprocess", "finetune", "evaluate"]
STAGES = [f"{s}@{DATASET}" for s in CHAIN]
OUTS = [f"data/raw/{DATASET}", f"data/nifti/{DATASET}", f"data/prep/{DATASET}", f"runs/finetune/{DATASET}",
        f"results/{DATASET}"]
RUN = f"{DATASET}/scratch/plain/nall-s0"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's dvc/snakemake/voco
    return env


def sh(*cmd: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert r.returncode == 0, f"{' '.join(cmd)} failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}"
    return r


def ran(r: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", r.stdout))


def digests(root: Path, rels: list[str]) -> dict[str, str]:
    """sha256 of every file under the given output folders (DVC's own .gitignore files excluded)."""
    out = {}
    for rel in rels:
        for p in sorted((root / rel).rglob("*")):
            if p.is_file() and p.name != ".gitignore":
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def set_key(text: str, section: str, key: str, value: str) -> str:
    """Replace `  key: ...` inside top-level `section:` of config.yaml (comments elsewhere untouched)."""
    start = text.index(f"\n{section}:\n")
    end = text.find("\n\n", start + 1)
    end = len(text) if end < 0 else end
    block, n = re.subn(rf"(?m)^  {key}: .*$", f"  {key}: {value}", text[start:end], count=1)
    assert n == 1, f"{section}.{key} not found in config.yaml"
    return text[:start] + block + text[end:]


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> tuple[Path, Path]:
    """The tracked + untracked-but-not-ignored files of this checkout, as a fresh git repository."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed (DVC needs it)")
    root = tmp_path_factory.mktemp("dvc")
    repo, remote = root / "repo", root / "remote"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            dest = repo / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest, follow_symlinks=False)
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "remote", "modify", "--local", "storage", "url", str(remote), cwd=repo)
    return repo, remote


def test_shipped_dvc_config(dvc_repo):
    repo, remote = dvc_repo
    cfg = dict(line.split("=", 1) for line in sh("dvc", "config", "--list", cwd=repo).stdout.split())
    assert cfg["cache.type"] == "hardlink,symlink"
    assert cfg["core.remote"] == "storage"
    assert cfg["remote.storage.url"] == str(remote)  # the test's own remote, set in .dvc/config.local
    shipped = sh("dvc", "config", "--project", "remote.storage.url", cwd=repo).stdout.strip()
    assert Path(shipped) == repo.parent / "voco-dvc-storage"  # default: a folder beside the repository


def test_stages_follow_config_datasets(dvc_repo):
    repo, _ = dvc_repo
    names = sh("dvc", "stage", "list", "--name-only", cwd=repo).stdout.split()
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    for dataset in config["datasets"]["downstream"]:
        for stage in CHAIN:
            assert f"{stage}@{dataset}" in names
    for dataset in config["datasets"]["pretrain"]:  # the corpus is tracked too: the pretrain stage depends on it
        for stage in ("raw", "convert", "preprocess"):
            assert f"{stage}@{dataset}" in names
    assert {"pretrain", "audit_leakage", "report"} <= set(names)


def test_committed_index_is_current(dvc_repo):
    """dvc.yaml is generated from the config (`voco dvc-index`); the committed file must match it."""
    repo, _ = dvc_repo
    r = subprocess.run(["voco", "dvc-index", "--check"], cwd=repo, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_stage_input_is_an_output_of_another_stage(dvc_repo):
    """Stage keys and rule paths agree: every pipeline-made dependency is some stage's output (no orphan inputs)."""
    repo, _ = dvc_repo
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())
    cfg = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    outs, deps = set(), {}
    for name, stage in doc["stages"].items():
        items = stage["foreach"] if "foreach" in stage else [None]
        body = stage.get("do", stage)
        for item in items:
            def sub(x, item=item):
                return x.replace("${item}", item) if item else x
            key = f"{name}@{item}" if item else name
            for o in body.get("outs", []) + body.get("metrics", []) + body.get("plots", []):
                outs.add(sub(next(iter(o)) if isinstance(o, dict) else o))
            deps[key] = [sub(d) for d in body.get("deps", [])]
    made = ("data/", "runs/", "results/")
    for key, ds in deps.items():
        for d in ds:
            if d.startswith(made):
                assert d in outs, f"stage {key}: dependency {d} is no stage's output"
    assert f"runs/pretrain/{cfg['pretrain']['run']}" in outs  # keyed on the rules' own pretrain.run
