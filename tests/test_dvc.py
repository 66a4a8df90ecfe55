"""DVC over the workflow, for real: a temp copy of the repository (git init, the shipped .dvc/config and dvc.yaml).

* `dvc repro evaluate@<dataset>` builds that dataset's chain only (raw -> convert -> preprocess -> finetune ->
  evaluate), through the same Snakemake rules and `voco` commands as `snakemake all`.
* An evaluation parameter changes: `dvc repro evaluate@<dataset>` re-runs the evaluation alone, from the cached
  checkpoint (the fine-tuning stage does not run again).
* Round trip through a local remote: push, wipe the cache and every output, pull: data, checkpoints and results come
  back bit-identical, and Snakemake agrees they are current after `snakemake --touch`.

Test configuration (edits of config/config.yaml in the temp copy, so that the chain fits the test budget): one init
(scratch), one seed, one method, 4 fine-tuning steps. The `pretrain` stage is marked done with an empty run folder
(`dvc commit`): a scratch init needs no checkpoint, and pre-training itself does not fit the budget.
"""

from __future__ import annotations

import hashlib
import json
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
    assert {"pretrain", "report"} <= set(names)


@pytest.mark.slow
def test_repro_one_evaluation_then_push_wipe_pull(dvc_repo):
    repo, remote = dvc_repo
    config_path = repo / "config" / "config.yaml"
    text = config_path.read_text()
    for key, value in {"inits": "[scratch]", "methods": "[plain]", "medcontext_datasets": "[]", "n_train": "[all]",
                       "seeds": "[0]", "steps": "4"}.items():
        text = set_key(text, "finetune", key, value)
    text = set_key(text, "evaluate", "original_space", "false")  # half the evaluation time
    config_path.write_text(text)
    pretrain_dir = repo / "runs" / "pretrain" / yaml.safe_load(text)["finetune"]["pretrain_run"]
    pretrain_dir.mkdir(parents=True)
    (pretrain_dir / "README").write_text("test: scratch init only, no pre-training\n")
    sh("dvc", "commit", "--force", "pretrain", cwd=repo)

    # One dataset's evaluation: its chain runs, nothing of the other datasets.
    r = sh("dvc", "repro", STAGES[-1], cwd=repo, timeout=500)
    assert ran(r) == set(STAGES), r.stdout[-3000:]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted([*STAGES, "pretrain"])
    assert {p.name for p in (repo / "data" / "prep").iterdir() if p.is_dir()} == {DATASET}
    summary = json.loads((repo / "results" / RUN / "summary.json").read_text())
    assert summary["dataset"] == DATASET and summary["n_cases"] > 0
    model = repo / "runs" / "finetune" / RUN / "model.pt"
    assert model.stat().st_nlink >= 2  # hardlinked into the DVC cache, not copied

    # Nothing changed: nothing runs.
    assert ran(sh("dvc", "repro", STAGES[-1], cwd=repo)) == set()

    # An evaluation parameter changes: only the evaluation re-runs, from the cached checkpoint.
    model_mtime = model.stat().st_mtime_ns
    config_path.write_text(set_key(config_path.read_text(), "evaluate", "nsd_tolerance_mm", "12.0"))
    r = sh("dvc", "repro", STAGES[-1], cwd=repo, timeout=300)
    assert ran(r) == {STAGES[-1]}, r.stdout[-3000:]
    assert model.stat().st_mtime_ns == model_mtime
    after = json.loads((repo / "results" / RUN / "summary.json").read_text())
    nsd = [m["nsd"] for m in (summary["metrics"]["resampled"]["mean"], after["metrics"]["resampled"]["mean"])]
    assert nsd[1] >= nsd[0] and after != summary, "a 3x wider NSD tolerance must change the evaluation"

    # Round trip through the remote: push, wipe the cache and every output, pull.
    before = digests(repo, OUTS)
    assert len(before) > 20 and f"runs/finetune/{RUN}/model.pt" in before
    sh("dvc", "push", cwd=repo)
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the remote"
    shutil.rmtree(repo / ".dvc" / "cache")
    for rel in ("data", "runs/finetune", "results"):
        shutil.rmtree(repo / rel)
    sh("dvc", "pull", *STAGES, cwd=repo)
    assert digests(repo, OUTS) == before
    assert "up to date" in sh("dvc", "status", *STAGES, cwd=repo).stdout

    # Snakemake's own records: after a pull, `snakemake --touch` marks the pulled files current (docs/cluster.md).
    target = f"results/{DATASET}/report/report.md"
    sh("snakemake", "--touch", "--cores", "1", target, cwd=repo)
    r = sh("snakemake", "-n", "--cores", "1", target, cwd=repo)
    assert "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
