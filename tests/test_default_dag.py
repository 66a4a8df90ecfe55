"""The whole default DAG for real, then what a user does next: change a value, re-run one result through DVC, clone.

One workspace (a copy of this checkout, its own git repository, a local DVC remote) runs the shipped default config
(every phantom dataset, VoCo SSL / VoComni / omni stages / SuPreM pre-training, fine-tuning, evaluation, report),
shrunk the way a user shrinks it: an override file with fewer steps and one seed, named in the user's own Snakemake
profile (a copy of the shipped local profile plus `configfiles:`), so that `snakemake --profile` and DVC's stages
(which run `snakemake` under $SNAKEMAKE_PROFILE) resolve the same config. No shipped file is edited.

* After the run, an unchanged config gives "Nothing to be done"; a changed `finetune.steps` schedules fine-tuning,
  evaluation and report jobs and nothing upstream, and a dry run rewrites no config file that jobs read.
* `dvc repro evaluate@phantom_organs` right after the run adopts the finished outputs: exit 0, no job re-runs.
* `dvc repro report` likewise; then push, a clean `git clone`, `dvc pull`: both stages are up to date there.
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
BIN = Path(sys.executable).parent
DATASET = "phantom_organs"

pytestmark = pytest.mark.slow

#: the user's shrink file: every step count small, one seed; datasets, inits, methods and N stay the shipped ones
SHRINK = {
    "pretrain": {"steps": 3, "checkpoint_every": 2, "log_every": 1,
                 "omni": {"stage1_steps": 2, "stage2_steps": 2, "pseudo_min_confidence": 0.0},
                 "suprem": {"steps": 2}},
    # two steps train no usable ensemble: keep every curated / pseudo-labelled volume instead of dropping them all
    "vocomni": {"steps": 2, "min_confidence": 0.0, "min_agreement": 0.0},
    "finetune": {"steps": 2, "seeds": [0]},
}


def _env(profile: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SNAKEMAKE_PROFILE", "VOCO_ROOT")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's snakemake / dvc / voco
    if profile is not None:
        env["SNAKEMAKE_PROFILE"] = str(profile)
    return env


def sh(*cmd: str, cwd: Path, profile: Path | None = None, timeout: int = 1800, check: bool = True):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(profile))
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-5000:]}"
    return r


def jobs_run(text: str) -> list[str]:
    """Rule names of the jobs Snakemake started (``rule X:`` / ``localrule X:`` lines)."""
    return re.findall(r"^\s*(?:local)?rule (\w+):", text, re.M)


def dry_run_rules(text: str) -> set[str]:
    rules = set(jobs_run(text))
    rules.discard("all")
    return rules


def tree_state(root: Path, rels: list[str]) -> dict[str, tuple[int, str]]:
    """(mtime, sha256) of every file under the folders (DVC's .gitignore files excluded)."""
    out = {}
    for rel in rels:
        for p in sorted((root / rel).rglob("*")):
            if p.is_file() and p.name != ".gitignore":
                out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A copy of the checkout after the (shrunk) default run, with git, DVC remote and the user's profile."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed (DVC needs it)")
    root = tmp_path_factory.mktemp("dag")
    repo, remote, profile = root / "repo", root / "remote", root / "myprofile"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            dest = repo / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest, follow_symlinks=False)
    sh("git", "init", "-q", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "checkout", "--allow-empty", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy", cwd=repo)
    sh("dvc", "remote", "modify", "--local", "storage", "url", str(remote), cwd=repo)
    shrink = root / "shrink.yaml"
    shrink.write_text(yaml.safe_dump(SHRINK))
    # the user's profile: the shipped local profile + the config files this user runs with
    profile.mkdir()
    local = yaml.safe_load((REPO / "config" / "profiles" / "local" / "config.yaml").read_text())
    local.update({"cores": 2, "configfiles": [str(repo / "config" / "config.yaml"), str(shrink)]})
    (profile / "config.yaml").write_text(yaml.safe_dump(local))
    r = sh("snakemake", "all", cwd=repo, profile=profile, timeout=2400)
    ran = jobs_run(r.stdout + r.stderr)
    assert {"pretrain_ssl", "vocomni", "pretrain_stage1", "pseudolabel", "pretrain_stage2", "pretrain_suprem",
            "finetune", "evaluate", "report"} <= set(ran), sorted(set(ran))
    assert (repo / "results" / "report" / "report.md").is_file()
    return {"repo": repo, "remote": remote, "profile": profile, "shrink": shrink, "root": root}


def test_unchanged_config_nothing_to_be_done(built):
    r = sh("snakemake", "-n", "all", cwd=built["repo"], profile=built["profile"])
    assert "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


def test_changed_finetune_steps_reruns_only_downstream(built):
    """As typed in the issue: `snakemake -n all --configfile config/config.yaml my.yaml` with another finetune.steps."""
    repo = built["repo"]
    mine = built["root"] / "my.yaml"
    mine.write_text(yaml.safe_dump({**SHRINK, "finetune": {**SHRINK["finetune"], "steps": 3}}))
    slices = repo / ".snakemake" / "voco" / "config"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in slices.iterdir()}
    r = sh("snakemake", "-n", "all", "--configfile", "config/config.yaml", str(mine), cwd=repo)
    rules = dry_run_rules(r.stdout + r.stderr)
    assert "finetune" in rules and rules <= {"finetune", "evaluate", "evaluate_dataset", "report"}, rules
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in slices.iterdir()}
    assert all(after[k] == v for k, v in before.items()), "a dry run rewrote a config file that jobs read"
    # the original config still has nothing to do (the dry run changed nothing)
    r = sh("snakemake", "-n", "all", cwd=repo, profile=built["profile"])
    assert "Nothing to be done" in r.stdout + r.stderr


def test_dvc_repro_one_evaluation_adopts_the_run(built):
    repo = built["repo"]
    watched = ["runs/pretrain", f"runs/finetune/{DATASET}", f"results/{DATASET}", f"data/prep/{DATASET}"]
    before = tree_state(repo, watched)
    r = sh("dvc", "repro", f"evaluate@{DATASET}", cwd=repo, profile=built["profile"], timeout=1200)
    out = r.stdout + r.stderr
    assert not jobs_run(out), f"jobs re-ran: {jobs_run(out)}\n{out[-3000:]}"
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert f"evaluate@{DATASET}" in ran and "pretrain" in ran, out[-3000:]  # adopted, not skipped
    after = tree_state(repo, watched)
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    assert all(after[k][0] == before[k][0] for k in before if k.endswith((".pt", "summary.json")))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert f"evaluate@{DATASET}" in lock["stages"] and "pretrain" in lock["stages"]
    assert "up to date" in sh("dvc", "status", f"evaluate@{DATASET}", cwd=repo).stdout


def test_dvc_report_then_clean_clone_after_pull(built):
    repo, remote = built["repo"], built["remote"]
    r = sh("dvc", "repro", "report", cwd=repo, profile=built["profile"], timeout=1500)
    assert not jobs_run(r.stdout + r.stderr), (r.stdout + r.stderr)[-3000:]
    report = json.loads((repo / "results" / "report" / "report.json").read_text())
    sh("dvc", "push", cwd=repo, timeout=900)
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing"
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results", cwd=repo)
    clone = built["root"] / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=built["root"])
    sh("dvc", "remote", "modify", "--local", "storage", "url", str(remote), cwd=clone)
    sh("dvc", "pull", cwd=clone, timeout=900)
    for stage in (f"evaluate@{DATASET}", "report"):
        r = sh("dvc", "repro", stage, cwd=clone, profile=built["profile"], timeout=900)
        assert not re.findall(r"Running stage '([^']+)'", r.stdout), r.stdout[-3000:]
    assert json.loads((clone / "results" / "report" / "report.json").read_text()) == report
    assert (clone / "runs" / "finetune" / DATASET).is_dir()
