"""Preemption and time limits: SIGTERM / SIGUSR1 checkpoint within 60 s and exit 75; the same command resumes past the
signal step; a run's outputs are completed as a group; the previous checkpoint is the fallback; atomic writes fsync.

The SLURM side (the profile's warning signal and retry through a real local cluster) is in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_pretrain import _override, make_store
from test_resume_identity import _outputs  # run folders without TensorBoard events / tracking files
from test_train_loop import _child_env, run_toy

REPO = Path(__file__).resolve().parents[1]
VOCO = str(Path(sys.executable).parent / "voco")
SIGNAL_TO_CHECKPOINT_LIMIT_S = 60.0


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("prep")
    return [make_store(base / "abd", "abd", "abdomen", 4, 0), make_store(base / "chest", "chest", "chest", 2, 1)]


def _metric_steps(path: Path) -> list[int]:
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _wait_for_steps(proc: subprocess.Popen, metrics: Path, n: int, timeout: float = 180.0) -> int:
    """Wait until the child has logged ``n`` steps; returns the number logged (fails if the child exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = _metric_steps(metrics)
        if len(steps) >= n:
            return len(steps)
        assert proc.poll() is None, f"the run ended before step {n}:\n{proc.communicate()[1][-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"no {n} steps logged in {timeout} s")


def _signal_and_wait(proc: subprocess.Popen, metrics: Path, sig: int, after: int) -> tuple[int, float, str]:
    """Send ``sig`` once ``after`` steps are logged; returns (steps logged at the signal, seconds to exit, stderr)."""
    logged = _wait_for_steps(proc, metrics, after)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return logged, time.monotonic() - t0, err


def _ck(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------- voco pretrain
@pytest.mark.slow
def test_sigterm_mid_pretraining_checkpoints_within_60s_and_resume_continues(tmp_path, stores):
    """`voco pretrain` gets SIGTERM mid-run: it finishes the step in flight, writes last.pt, exits 75 within 60 s; the
    same command resumes at that step and ends with the weights of a run that was never interrupted."""
    steps = 150
    ov = _override(tmp_path, checkpoint_every=1000, log_every=10)  # no periodic last.pt: the signal writes it
    out = tmp_path / "run"
    cmd = [VOCO, "pretrain", "--method", "voco", "--prep", *map(str, stores), "--out", str(out), "--steps", str(steps),
           "--override", str(ov)]
    env = dict(_child_env(), VOCO_ROOT=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logged, took, err = _signal_and_wait(proc, out / "metrics.jsonl", signal.SIGTERM, after=10)

    assert proc.returncode == 75, err[-3000:]
    assert took < SIGNAL_TO_CHECKPOINT_LIMIT_S, took
    assert "received SIGTERM" in err and "interrupted, resumable" in err
    assert not (out / "final.pt").exists() and not (out / "backbone.pt").exists()
    stopped_at = _ck(out / "last.pt")["step"]
    # at most the step in flight was still done after the signal; nothing was lost
    assert logged <= stopped_at <= logged + 1 < steps, (logged, stopped_at)
    assert _metric_steps(out / "metrics.jsonl") == list(range(1, stopped_at + 1))
    print(f"signal -> checkpoint written and process exited: {took:.2f} s (step {stopped_at} of {steps})")
    # the failed attempt's declared outputs are removed by Snakemake (metrics.jsonl, progress.png); last.pt is not one
    (out / "metrics.jsonl").unlink()
    (out / "progress.png").unlink()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out / 'last.pt'} at step {stopped_at}" in done.stderr
    assert _metric_steps(out / "metrics.jsonl") == list(range(1, steps + 1))
    final = _ck(out / "final.pt")
    assert final["step"] == steps
    # outputs complete as a group: the resumable checkpoints are gone, only the rule's outputs are left
    assert _outputs(out) == ["backbone.pt", "final.pt", "metrics.jsonl", "progress.png",
                                                      "summary.json"]

    ref = tmp_path / "ref"
    ok = subprocess.run([*cmd[:cmd.index("--out") + 1], str(ref), *cmd[cmd.index("--out") + 2:]], env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    for name, value in _ck(ref / "final.pt")["model"].items():
        assert torch.equal(final["model"][name], value), name


@pytest.mark.slow
def test_sigterm_to_every_process_with_loader_workers(tmp_path, stores):
    """As SLURM does: SIGTERM to every process of the job (here its process group), DataLoader workers included. The
    workers ignore it, so the training process still finishes its step, checkpoints and exits 75."""
    steps = 150
    out = tmp_path / "run"
    cmd = [VOCO, "pretrain", "--method", "voco", "--prep", *map(str, stores), "--out", str(out), "--steps", str(steps),
           "--num-workers", "2", "--override", str(_override(tmp_path, checkpoint_every=1000))]
    env = dict(_child_env(), VOCO_ROOT=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    logged = _wait_for_steps(proc, out / "metrics.jsonl", 5)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert time.monotonic() - t0 < SIGNAL_TO_CHECKPOINT_LIMIT_S
    assert "DataLoader worker" not in err  # without the workers ignoring it: "DataLoader worker ... killed by signal"
    assert logged <= _ck(out / "last.pt")["step"] <= logged + 1


@pytest.mark.slow
def test_sigusr1_checkpoints_and_resume_matches_uninterrupted_run(tmp_path):
    """The shared loop on SIGUSR1 (the other signal SLURM users ask for): exit 75, exact resume past the signal step."""
    steps = 40
    ref_model, ref_ema, _ = run_toy(tmp_path / "ref", steps=steps, noisy=True, checkpoint_every=1000)
    out = tmp_path / "toy"
    cmd = [sys.executable, str(REPO / "tests" / "test_train_loop.py"), "toy", str(out), "--steps", str(steps)]
    proc = subprocess.Popen([*cmd, "--sleep", "0.1"], env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    logged, took, err = _signal_and_wait(proc, out / "metrics.jsonl", signal.SIGUSR1, after=5)
    assert proc.returncode == 75, err[-3000:]
    assert took < SIGNAL_TO_CHECKPOINT_LIMIT_S
    stopped_at = _ck(out / "last.pt")["step"]
    assert logged <= stopped_at <= logged + 1 < steps
    done = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {stopped_at}" in done.stderr
    resumed = _ck(out / "final.pt")
    for name, ref in ref_model.state_dict().items():
        assert torch.equal(resumed["model"][name], ref), name
    for name, ref in ref_ema.module.state_dict().items():
        assert torch.equal(resumed["ema"]["module"][name], ref), name


@pytest.mark.slow
def test_sigterm_to_the_ddp_launcher_stops_every_rank_at_one_step(tmp_path, stores):
    """`voco pretrain --nproc 2`: SIGTERM to the launching process reaches both torchrun workers; they stop after the
    same step, rank 0 writes last.pt (two RNG states), the launcher exits 75, and `--nproc 2` resumes it."""
    steps = 150
    out = tmp_path / "ddp"
    cmd = [VOCO, "pretrain", "--method", "voco", "--prep", *map(str, stores), "--out", str(out), "--steps", str(steps),
           "--nproc", "2", "--override", str(_override(tmp_path, batch_size=1, checkpoint_every=1000))]
    env = dict(_child_env(), VOCO_ROOT=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logged, took, err = _signal_and_wait(proc, out / "metrics.jsonl", signal.SIGTERM, after=5)
    assert proc.returncode == 75, err[-4000:]
    assert took < SIGNAL_TO_CHECKPOINT_LIMIT_S, took
    ck = _ck(out / "last.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert logged <= ck["step"] <= logged + 1 < steps
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"at step {ck['step']}" in done.stderr
    assert _ck(out / "final.pt")["step"] == steps
    assert _metric_steps(out / "metrics.jsonl") == list(range(1, steps + 1))


# -------------------------------------------------------------------------------------- outputs as a group, fallback
@pytest.mark.slow
def test_a_job_that_dies_after_final_pt_resumes_at_its_last_step(tmp_path, stores):
    """The job fails after final.pt but before backbone.pt (here: backbone.pt cannot be written); Snakemake then removes
    final.pt, its declared output. last.pt was kept, so the retry does not train again: it restores final.pt and
    writes the missing outputs; only then are last.pt / previous.pt removed."""
    from voco.cli import main

    out = tmp_path / "ssl"
    argv = ["pretrain", "--method", "voco", "--prep", *map(str, stores), "--out", str(out), "--steps", "4",
            "--override", str(_override(tmp_path))]
    (out / "backbone.pt").mkdir(parents=True)  # os.replace onto a folder fails: the job dies after final.pt
    with pytest.raises(OSError):
        main(argv)
    assert (out / "final.pt").is_file() and _ck(out / "last.pt")["step"] == 4
    metrics_before = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("final.pt", "metrics.jsonl", "progress.png"):  # what Snakemake does with a failed job's outputs
        (out / name).unlink()
    (out / "backbone.pt").rmdir()

    assert main(argv) == 0
    # not one step trained again: the curves come back from the checkpoint, identical
    assert [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] == metrics_before
    assert (out / "progress.png").is_file()
    assert _ck(out / "final.pt")["step"] == 4
    assert (out / "backbone.pt").is_file() and (out / "summary.json").is_file()
    assert not (out / "last.pt").exists() and not (out / "previous.pt").exists()


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    steps = 6
    ref_model, _, _ = run_toy(tmp_path / "ref", steps=steps, noisy=True)
    out = tmp_path / "run"
    run_toy(out, steps=steps, noisy=True, finish=False)  # as a stage does: last.pt / previous.pt kept
    assert _ck(out / "last.pt")["step"] == steps and _ck(out / "previous.pt")["step"] == 4
    (out / "final.pt").unlink()
    (out / "last.pt").unlink()  # final.pt was a hard link of it: write a torn file in its place
    (out / "last.pt").write_bytes(b"PK\x03\x04 torn by a crash")
    with caplog.at_level("WARNING"):
        model, _, res = run_toy(out, steps=steps, noisy=True)
    assert "last.pt: not a readable weights-only checkpoint" in caplog.text
    assert res.resumed_from == 4
    for name, ref in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], ref), name
    assert not (out / "last.pt").exists() and not (out / "previous.pt").exists()


def test_final_checkpoint_is_the_last_one_and_stays_after_last_pt_goes(tmp_path):
    _, _, res = run_toy(tmp_path, steps=4, noisy=False, finish=False)
    final, last = tmp_path / "final.pt", tmp_path / "last.pt"
    assert final.read_bytes() == last.read_bytes()
    from voco.train.checkpoint import finish_run

    finish_run(tmp_path)
    assert not last.exists() and _ck(final)["step"] == 4


def test_atomic_writes_fsync_the_data_before_the_rename(tmp_path, monkeypatch):
    """The temporary file is fsynced before it is renamed onto the target, and the folder after (crash safety)."""
    from voco import io

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "x.json"
    io.write_json(target, {"a": 1})
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert Path(events[0][1]).name.startswith(".x.json.") and events[1][1] == str(target)
    assert events[2][1] == str(tmp_path)
    assert json.loads(target.read_text()) == {"a": 1}


def test_stop_request_is_raised_once_and_the_handlers_are_restored(tmp_path):
    """In-process (a library caller): a real SIGTERM mid-run raises Interrupted with last.pt written; the loop then
    restores the previous handler and forgets the request, so the next call resumes."""
    from voco.errors import Interrupted
    from voco.train import preempt

    before = signal.getsignal(signal.SIGTERM)
    metrics = tmp_path / "metrics.jsonl"

    def send_when_running():
        deadline = time.monotonic() + 60
        while len(_metric_steps(metrics)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=send_when_running)
    t.start()
    with pytest.raises(Interrupted) as info:
        run_toy(tmp_path, steps=400, noisy=False, sleep=0.02, checkpoint_every=1000)
    t.join()
    assert info.value.signal_name == "SIGTERM" and info.value.step == _ck(tmp_path / "last.pt")["step"]
    assert signal.getsignal(signal.SIGTERM) is before and preempt.requested() is None
    _, _, res = run_toy(tmp_path, steps=info.value.step + 2, noisy=False, checkpoint_every=1000)
    assert res.resumed_from == info.value.step and res.step == info.value.step + 2
