"""The SLURM profile on a real single-node SLURM cluster (brought up by `.ci/slurm-up`; skipped when none answers).

* `snakemake --profile slurm -n all` resolves from the repository root (no cluster needed for a dry run).
* A small part of the project DAG (one phantom dataset: synth -> convert -> preprocess per shard -> merge) runs through
  `snakemake --profile slurm`, typed as a user types it from the repository root (the root `slurm` symlink), in a temp
  working directory. Every job must appear in the accounting database (sacct) under this run's SLURM job name, with the
  profile's partition and account and the rule in the job comment, and the merged manifest must be complete.
* A GPU rule: the profile's set-resources gives it `gpu: N` (-> `sbatch --gpus=N`) and `cpus_per_gpu` on the GPU
  partition. The local node advertises 4 scheduling-only fake GPUs (gres on /dev/null and character devices, no CUDA),
  so the job sees CUDA_VISIBLE_DEVICES=0,1,2,3 and `--nproc auto` resolves to 4 torchrun processes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = yaml.safe_load((REPO / "config" / "profiles" / "slurm" / "config.yaml").read_text())
DATASET = "phantom_chest"  # small phantom (8 chest CTs); the DAG below is its data phase only
SCHEDULER_TIMEOUT = 170  # hard limit (SIGKILL) on every call that waits on the scheduler


def _sinfo_answers() -> str | None:
    """None when a SLURM controller answers, else the reason to skip."""
    if shutil.which("sinfo") is None:
        return "no `sinfo` on PATH (install the SLURM packages and run `sudo .ci/slurm-up`)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer in 15 s (is slurmctld running? `sudo .ci/slurm-up`)"
    if r.returncode != 0:
        return f"`sinfo` failed: {r.stderr.strip()[:200]} (bring the test cluster up with `sudo .ci/slurm-up`)"
    partitions = {line.split()[0].rstrip("*") for line in r.stdout.splitlines() if line.strip()}
    wanted = PROFILE["default-resources"]["slurm_partition"]
    if wanted not in partitions:
        return f"SLURM has no partition {wanted!r} (the profile's default); partitions: {sorted(partitions)}"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    """Skip (with the reason) unless a SLURM controller answers; asked only by the tests that need one."""
    reason = _sinfo_answers()
    if reason:
        pytest.skip(reason)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's snakemake and voco
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def run_snakemake(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, str]:
    """snakemake --profile slurm ... under a hard SIGKILL limit; returns the result and this run's SLURM run ID."""
    cmd = ["timeout", "-s", "KILL", str(SCHEDULER_TIMEOUT), sys.executable, "-m", "snakemake", "--profile", "slurm",
           *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
    out = r.stdout + r.stderr
    m = re.search(r"SLURM run ID: ([0-9a-f-]{36})", out)
    assert r.returncode == 0 and m, f"snakemake --profile slurm failed (rc {r.returncode}):\n{out[-5000:]}"
    return r, m.group(1)


def sacct_jobs(run_id: str, expected: int) -> list[dict[str, str]]:
    """Accounting records of the jobs named `run_id` (the executor names every job of a run after its run ID).

    slurmctld hands finished jobs to slurmdbd asynchronously, so poll briefly until all `expected` are COMPLETED."""
    fields = ["JobID", "JobName", "Partition", "Account", "State", "Comment", "AllocTRES", "ExitCode"]
    deadline = time.monotonic() + 30
    while True:
        r = subprocess.run(["sacct", "-X", "-n", "-P", "--name", run_id, "-S", "now-1hour", "-o", ",".join(fields)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        rows = [dict(zip(fields, line.split("|"), strict=True)) for line in r.stdout.splitlines() if line.strip()]
        if len(rows) >= expected and all(row["State"] == "COMPLETED" for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def test_profile_resolves_from_repo_root(tmp_path):
    """`slurm` at the repository root is the committed symlink, so `snakemake --profile slurm -n all` works as typed
    (a dry run needs no cluster): every GPU rule named in set-resources exists, and gets its GPUs."""
    link = REPO / "slurm"
    assert link.is_symlink() and os.readlink(link) == "config/profiles/slurm"
    assert PROFILE["executor"] == "slurm"
    r = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "all", "--forceall",
                        "--directory", str(tmp_path)], cwd=REPO, capture_output=True, text=True, env=_env(),
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Using profile slurm" in out
    scheduled = set(re.findall(r"^rule (\w+):", out, re.M)) | set(re.findall(r"^localrule (\w+):", out, re.M))
    for rule, res in PROFILE["set-resources"].items():
        assert rule in scheduled, f"set-resources names {rule}, which `all` does not schedule"
        block = re.search(rf"^rule {rule}:\n(.*?)\n\n", out, re.M | re.S).group(1)
        assert f"gpu={res['gpu']}," in block and f"slurm_partition={res['slurm_partition']}," in block, block


@pytest.mark.slow
@pytest.mark.slurm
def test_data_phase_runs_through_sbatch(cluster, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    override = tmp_path / "test-cluster.yaml"
    # Test override: no GPUs are involved in the data phase; two shards so that two jobs can run side by side.
    override.write_text(yaml.safe_dump({"preprocess": {"shards": 2}}))
    target = f"data/prep/{DATASET}/manifest.parquet"
    slurm_logs = tmp_path / "slurm-logs"
    r, run_id = run_snakemake(
        [target, "--directory", str(work), "--slurm-logdir", str(slurm_logs), "--slurm-keep-successful-logs",
         "--slurm-init-seconds-before-status-checks", "2", "--jobs", "2",
         "--configfile", str(REPO / "config" / "config.yaml"), str(override)],
        cwd=REPO,  # as a user types it: from the repository root, `--profile slurm` finds ./slurm
    )

    expected_rules = ["synth", "convert", "preprocess", "preprocess", "merge_manifest"]
    rows = sacct_jobs(run_id, len(expected_rules))
    assert len(rows) == len(expected_rules), rows
    assert all(row["State"] == "COMPLETED" and row["ExitCode"] == "0:0" for row in rows), rows
    assert {row["Partition"] for row in rows} == {PROFILE["default-resources"]["slurm_partition"]}
    assert {row["Account"] for row in rows} == {PROFILE["default-resources"]["slurm_account"]}
    # the executor's job comment is rule_<rule>_wildcards_<values joined by _>
    rules = sorted(re.fullmatch(rf"rule_(\w+?)_wildcards_{DATASET}(_\d+)?", row["Comment"]).group(1) for row in rows)
    assert rules == sorted(expected_rules), rows
    shards = sorted(row["Comment"].rsplit("_", 1)[1] for row in rows if row["Comment"].startswith("rule_preprocess_"))
    assert shards == ["0", "1"], rows
    # the jobs ran on the cluster, not here: each left its sbatch log with the SLURM job id in its name
    for row in rows:
        assert list(slurm_logs.rglob(f"{row['JobID']}.log")), f"no sbatch log for job {row['JobID']} in {slurm_logs}"

    card = yaml.safe_load((REPO / "config" / "datasets" / f"{DATASET}.yaml").read_text())
    manifest = pd.read_parquet(work / target)
    assert len(manifest) == card["expected_count"]
    assert set(manifest["dataset"]) == {DATASET}
    assert (manifest["status"] == "ok").all(), manifest[manifest["status"] != "ok"][["case_id", "reason"]]
    assert set(manifest["split"]) <= {"train", "test"}
    prep = (work / target).parent
    for rel in manifest["image"]:
        assert (prep / rel).exists(), f"manifest names {rel}, which the SLURM job did not write"
    assert {p.name for p in prep.glob("shard-*")} == {"shard-0", "shard-1"}


@pytest.mark.slow
@pytest.mark.slurm
def test_gpu_rule_gets_the_profiles_gpus_and_torchrun_sees_them(cluster, tmp_path):
    """A rule named like the SSL pre-training rule, declaring gpu=0 like every rule (the laptop default), is given
    the profile's GPUs on the GPU partition; inside the job, `voco pretrain --nproc auto` (what rules/pretrain.smk
    passes when gpu > 1) starts one torchrun process per visible GPU (voco.train.distributed.resolve_nproc)."""
    rule = "pretrain_ssl"
    wanted = PROFILE["set-resources"][rule]
    (tmp_path / "Snakefile").write_text(textwrap.dedent(f"""
        rule {rule}:
            output: "nproc.txt"
            log: "logs/{rule}.log"
            resources: gpu=0, mem_mb=500, runtime=5
            shell: "python -c 'from voco.train.distributed import resolve_nproc; print(resolve_nproc(\\"auto\\"))'"
                   " > {{output}} 2> {{log}}"
    """))
    r, run_id = run_snakemake(
        ["nproc.txt", "--snakefile", str(tmp_path / "Snakefile"), "--directory", str(tmp_path),
         "--slurm-logdir", str(tmp_path / "slurm-logs"), "--slurm-init-seconds-before-status-checks", "2"],
        cwd=REPO,
    )
    rows = sacct_jobs(run_id, 1)
    assert len(rows) == 1 and rows[0]["State"] == "COMPLETED", rows
    assert rows[0]["Partition"] == wanted["slurm_partition"]
    tres = dict(item.split("=", 1) for item in rows[0]["AllocTRES"].split(","))
    assert tres["gres/gpu"] == str(wanted["gpu"]), rows[0]
    assert tres["cpu"] == str(wanted["gpu"] * wanted["cpus_per_gpu"]), rows[0]
    assert (tmp_path / "nproc.txt").read_text().strip() == str(wanted["gpu"])
