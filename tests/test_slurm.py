"""The SLURM profile on a real single-node SLURM cluster (brought up by `.ci/slurm-up`; skipped when none answers).

* `snakemake --profile slurm -n all` resolves from the repository root (no cluster needed for a dry run).
* A small part of the project DAG (one phantom dataset: synth -> convert -> preprocess per shard -> merge) runs through
  `snakemake --profile slurm`, typed as a user types it from the repository root (the root `slurm` symlink), in a temp
  working directory. Every job must appear in the accounting database (sacct) under this run's SLURM job name, with the
  profile's partition and account and the rule in the job comment, and the merged manifest must be complete.
* A GPU rule: the profile's set-resources gives it `gpu: N` (-> `sbatch --gpus=N`) and `cpus_per_gpu` on the GPU
  partition. The local node advertises 4 scheduling-only fake GPUs (gres on /dev/null and character devices, no CUDA),
  so the job sees CUDA_VISIBLE_DEVICES=0,1,2,3 and `--nproc auto` resolves to 4 torchrun processes.
* Preemption / time limits: a training job gets the profile's warning signal (SIGTERM, as `--signal=TERM@300` sends
  it), checkpoints and exits 75; Snakemake's retry resumes it in a new SLURM job, losing nothing.
* Multi-node pre-training through the same code path with one node and gloo: `srun` + `torchrun --nnodes` with a
  c10d rendezvous on the allocation's first node.
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
    # time limits / preemption: every training rule is retried more often (preemptible), asks for SIGTERM 300 s
    # before its limit, and runs voco as the job's own process (exec: no shell that a signal could kill under it)
    training = set(PROFILE["preemptible-rules"])
    assert training == {"pretrain_ssl", "pretrain_stage1", "pretrain_stage2", "pretrain_suprem", "vocomni",
                        "finetune"} and PROFILE["preemptible-retries"] >= PROFILE["retries"]
    assert PROFILE["slurm-requeue"] is True
    for rule in training:
        block = re.search(rf"^rule {rule}:\n(.*?)\n\n", out, re.M | re.S).group(1)
        assert "slurm_extra=--signal=TERM@300" in block, block
        assert re.search(r"^Shell command: exec env OMP_NUM_THREADS=\d+ voco ", block, re.M), block


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


# ------------------------------------------------------------------------------------ preemption / multi-node (voco)
def _pretrain_stores(root: Path) -> list[Path]:
    from test_pretrain import make_store

    return [make_store(root / "abd", "abd", "abdomen", 4, 0), make_store(root / "chest", "chest", "chest", 2, 1)]


def _training_override(path: Path) -> Path:
    """A tiny VoCo run (cnn_small, 16^3 crops): ~0.1 s a step here; no periodic checkpoint (the signal writes it)."""
    from test_pretrain import _override

    path.mkdir(parents=True, exist_ok=True)
    return _override(path, checkpoint_every=100000, log_every=25)


def _steps_logged(path: Path) -> list[int]:
    import json

    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip().endswith("}")]


@pytest.mark.slow
@pytest.mark.slurm
def test_training_job_stops_on_the_warning_signal_and_the_retry_resumes(cluster, tmp_path):
    """A training rule submitted through the shipped profile: sbatch carries the warning signal (SIGTERM 300 s before
    the time limit) and --requeue. SLURM delivers that signal to the job's steps (here `scancel --signal=TERM`, what
    --signal=TERM@300 does at its time): the training finishes its step, writes last.pt within 60 s and exits 75;
    Snakemake retries the job (training rules are preemptible: more attempts) and the new SLURM job resumes at the
    signal step, losing nothing."""
    steps = 300
    stores = _pretrain_stores(tmp_path / "prep")
    ov = _training_override(tmp_path / "ov")
    work = tmp_path / "work"
    work.mkdir()
    # Named like the real rule, so that the profile's set-resources, slurm_extra and preemptible-rules apply to it;
    # its command has the real rule's form (`exec env ... voco pretrain ... > {log}`, rules/pretrain.smk).
    (tmp_path / "Snakefile").write_text(textwrap.dedent(f"""
        rule pretrain_ssl:
            output: final="run/final.pt", backbone="run/backbone.pt", summary="run/summary.json",
                    metrics="run/metrics.jsonl", progress="run/progress.png"
            log: "logs/pretrain_ssl.log"
            resources: gpu=0, mem_mb=2000, runtime=10
            shell: "exec env OMP_NUM_THREADS=1 voco pretrain --method voco --prep {' '.join(map(str, stores))}"
                   " --out run --steps {steps} --nproc 1 --override {ov} > {{log}} 2>&1"
    """))
    out_file = tmp_path / "snakemake.out"
    cmd = ["timeout", "-s", "KILL", "400", sys.executable, "-m", "snakemake", "--profile", "slurm", "run/final.pt",
           "--snakefile", str(tmp_path / "Snakefile"), "--directory", str(work), "--slurm-logdir",
           str(tmp_path / "slurm-logs"), "--slurm-init-seconds-before-status-checks", "2", "--verbose"]
    with out_file.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, text=True, env=_env())
    run = work / "run"
    deadline = time.monotonic() + 200
    while len(_steps_logged(run / "metrics.jsonl")) < 10:
        assert proc.poll() is None and time.monotonic() < deadline, out_file.read_text()[-5000:]
        time.sleep(0.05)
    first = re.search(r"submitted with SLURM jobid (\d+)", out_file.read_text()).group(1)
    logged = len(_steps_logged(run / "metrics.jsonl"))
    t0 = time.time()
    subprocess.run(["scancel", "--signal=TERM", first], check=True, timeout=30)
    while not (run / "last.pt").is_file():
        assert time.time() - t0 < 60, "no last.pt 60 s after the signal"
        time.sleep(0.02)
    signal_to_checkpoint = (run / "last.pt").stat().st_mtime - t0
    import torch

    stopped = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["step"]
    assert logged <= stopped < steps  # nothing logged before the signal was lost
    assert proc.wait(timeout=380) == 0, out_file.read_text()[-6000:]
    out = out_file.read_text()

    sbatch = re.findall(r"sbatch call: (sbatch .*)", out)
    assert sbatch and all("--signal=TERM@300" in c and "--requeue" in c for c in sbatch), sbatch
    jobs = re.findall(r"submitted with SLURM jobid (\d+)", out)
    assert len(jobs) == 2 and jobs[0] == first, out[-4000:]  # the interrupted job and its retry
    # the first attempt: voco itself exited 75 ("interrupted, resumable"), after writing last.pt (its log, which the
    # retry replaces, is in Snakemake's output: show-failed-logs); it was not killed with the shell around it
    assert "returned non-zero exit status 75" in out and "died with <Signals.SIGTERM" not in out
    assert "received SIGTERM" in out and f"last.pt at step {stopped} / {steps} written" in out
    log = (work / "logs" / "pretrain_ssl.log").read_text()  # the retry's
    assert f"resuming from run/last.pt at step {stopped} / {steps}" in log, log[-3000:]
    assert _steps_logged(run / "metrics.jsonl") == list(range(1, steps + 1))
    assert torch.load(run / "final.pt", map_location="cpu", weights_only=True)["step"] == steps
    assert not (run / "last.pt").exists()
    assert signal_to_checkpoint < 60.0
    print(f"SLURM: signal -> last.pt in {signal_to_checkpoint:.2f} s (step {stopped}); retry job {jobs[1]} resumed")
    states = {}
    for _ in range(30):  # slurmdbd records finished jobs asynchronously
        r = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(jobs), "-o", "JobID,State"], capture_output=True,
                           text=True, timeout=30)
        states = dict(line.split("|") for line in r.stdout.splitlines() if line.strip())
        if states.get(jobs[1]) == "COMPLETED":
            break
        time.sleep(1)
    assert states.get(first) == "FAILED" and states.get(jobs[1]) == "COMPLETED", states


@pytest.mark.slow
@pytest.mark.slurm
def test_pretraining_spans_nodes_through_srun_and_torchrun(cluster, tmp_path):
    """The multi-node path on the local cluster with one node and gloo: a rule with the `nodes` resource (sbatch
    --nodes) runs `voco pretrain --nodes {resources.nodes} --nproc 2`, which starts `srun` (one task per node, inside
    the job's allocation) + `torchrun --nnodes` with a c10d rendezvous on the first node; two DDP ranks train."""
    stores = _pretrain_stores(tmp_path / "prep")
    ov = _training_override(tmp_path / "ov")
    (tmp_path / "Snakefile").write_text(textwrap.dedent(f"""
        rule multinode:
            output: "run/final.pt"
            log: "logs/multinode.log"
            resources: gpu=0, mem_mb=3000, runtime=10, nodes=1
            threads: 2
            shell: "exec env OMP_NUM_THREADS=1 voco pretrain --method voco --prep {' '.join(map(str, stores))}"
                   " --out run --steps 4 --batch-size 1 --nproc 2 --nodes {{resources.nodes}} --override {ov}"
                   " > {{log}} 2>&1"
    """))
    r, run_id = run_snakemake(
        ["run/final.pt", "--snakefile", str(tmp_path / "Snakefile"), "--directory", str(tmp_path),
         "--slurm-logdir", str(tmp_path / "slurm-logs"), "--slurm-init-seconds-before-status-checks", "2"],
        cwd=REPO,
    )
    log = (tmp_path / "logs" / "multinode.log").read_text()
    m = re.search(r"launching 1 node\(s\) x 2 DDP process\(es\) in SLURM job (\d+) \(head (\S+)\): (srun .*)", log)
    assert m, log[-4000:]
    launch = m.group(3)
    assert "--overlap" in launch and "--nodes=1" in launch and "--ntasks-per-node=1" in launch
    assert "--rdzv_backend=c10d" in launch and f"--rdzv_endpoint={m.group(2)}:" in launch and "--nnodes=1" in launch
    import torch

    ck = torch.load(tmp_path / "run" / "final.pt", map_location="cpu", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 4
    # the torchrun step ran inside the job's allocation as its own job step, next to the Snakemake step
    r = subprocess.run(["sacct", "-n", "-P", "-j", m.group(1), "-o", "JobID,JobName,State"], capture_output=True,
                       text=True, timeout=30)
    steps = [line.split("|") for line in r.stdout.splitlines() if line.strip()]
    assert any(s[0] == f"{m.group(1)}.1" for s in steps), steps


def test_srun_command_for_an_allocation():
    """The launcher's command line for a 2-node allocation with 4 GPUs per node (pure; no cluster needed)."""
    from voco.train.distributed import rendezvous_port, srun_command

    alloc = {"job_id": "4242", "hosts": ["n1", "n2"], "nodes": 2, "cpus_per_node": 32, "gpus_per_node": 4,
             "head": "10.0.0.1"}
    cmd = srun_command(2, 4, ["pretrain", "--out", "x"], alloc)
    assert cmd[:9] == ["srun", "--jobid=4242", "--overlap", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                       "--cpus-per-task=32", "--mem=0", "--kill-on-bad-exit=1"]
    assert "--gpus-per-node=4" in cmd
    tail = cmd[cmd.index("--gpus-per-node=4") + 1:]
    assert "--nnodes=2" in tail and "--nproc_per_node=4" in tail and "--rdzv_backend=c10d" in tail
    assert f"--rdzv_endpoint=10.0.0.1:{rendezvous_port('4242')}" in tail and "--standalone" not in tail
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in tail
    assert tail[-5:] == ["-m", "voco.cli", "pretrain", "--out", "x"]
    from voco.errors import ConfigError

    with pytest.raises(ConfigError, match="has 2 node"):
        srun_command(3, 4, ["pretrain"], alloc)
