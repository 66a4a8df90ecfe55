"""The shared training loop: checkpoints, exact resume after SIGKILL, DDP (2 CPU processes, gloo) parity, logging.

This file is also the child script of the subprocess tests: ``python tests/test_train_loop.py MODE OUT [options]``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
B_GLOBAL = 4
BATCHES_PER_EPOCH = 3
SIDE = 16


def toy_model(seed: int = 0):
    from voco.models import build_model

    torch.manual_seed(seed)
    return build_model("cnn_small", in_channels=1, out_channels=2, feature_size=4)


def toy_batches(epoch: int, start: int = 0):
    """Deterministic per epoch; each rank takes its contiguous share of the global batch."""
    from voco.train import distributed as dist

    g = torch.Generator().manual_seed(1000 + epoch)
    xs = torch.rand(BATCHES_PER_EPOCH, B_GLOBAL, 1, SIDE, SIDE, SIDE, generator=g)
    per = B_GLOBAL // dist.world_size()
    r = dist.rank()
    for t in range(start, BATCHES_PER_EPOCH):
        yield {"x": xs[t, r * per : (r + 1) * per]}


def make_step(noisy: bool):
    def step(net, batch):
        x = batch["x"]
        if noisy:  # exercise the torch, numpy and python RNG streams (all must be restored on resume)
            x = torch.nn.functional.dropout(x, 0.2, training=True)
            x = x + 0.01 * torch.from_numpy(np.random.normal(size=x.shape).astype(np.float32))
            x = x * (1.0 + 0.01 * random.random())
        logits = net(x)
        target = (batch["x"] > 0.5).long()[:, 0]
        loss = torch.nn.functional.cross_entropy(logits, target)
        acc = (logits.argmax(1) == target).float().mean()
        return {"total": loss, "ce": loss.detach(), "acc": acc}

    return step


def run_toy(out: str | Path, steps: int, noisy: bool, sleep: float = 0.0, checkpoint_every: int = 2, stage: str = "toy",
            finish: bool = True, identity: dict | None = None):
    from voco.ssl.heads import EMA
    from voco.train.loop import LoopConfig, train

    torch.set_num_threads(1)
    model = toy_model()
    ema = EMA.copy_of(model, 0.9)

    def after(step_no, m):
        ema.update(m)
        if sleep:
            time.sleep(sleep)

    cfg = LoopConfig(steps=steps, lr=3e-3, warmup=2, checkpoint_every=checkpoint_every, seed=5, stage=stage,
                     method="test", log_every=1)
    res = train(model, make_step(noisy), toy_batches, cfg, out, ema=ema, after_step=after, crops_per_step=B_GLOBAL,
                finish=finish, identity=identity)
    return model, ema, res


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ------------------------------------------------------------------------------------------------------------ tests
def test_checkpoint_contract_and_progress_files(tmp_path):
    model, ema, res = run_toy(tmp_path, steps=4, noisy=True)
    assert res.final == tmp_path / "final.pt" and res.final.is_file()
    assert not (tmp_path / "last.pt").exists()
    ck = torch.load(res.final, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "ema", "rng", "step", "stage", "method", "config", "data"):
        assert key in ck, key
    assert ck["step"] == 4 and ck["stage"] == "toy" and ck["method"] == "test"
    assert set(ck["rng"][0]) >= {"python", "numpy", "torch"}
    assert ck["ema"]["updates"] == 4
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert {"total", "ce", "acc", "lr", "crops_per_s", "step_s"} <= set(lines[0])
    assert lines[0]["lr"] == pytest.approx(3e-3 * 0.5)  # warmup step 1 of 2 -> then cosine
    png = tmp_path / "progress.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # finished runs are not redone
    _, _, again = run_toy(tmp_path, steps=4, noisy=True)
    assert again.resumed_from == 4


def test_resume_refuses_another_stage(tmp_path):
    from voco.errors import CheckpointError

    run_toy(tmp_path, steps=2, noisy=False)
    with pytest.raises(CheckpointError, match="stage"):
        run_toy(tmp_path, steps=3, noisy=False, stage="other")


def test_lr_schedule_warmup_then_cosine_to_zero():
    from voco.train.loop import lr_lambda

    f = lr_lambda(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)


def test_schedule_steps_spans_several_runs():
    """A run that is the first part of a longer schedule (omni stage 1 of stage 1 + stage 2) follows the whole curve:
    with warmup 0 and schedule_steps 10, step 6 of 6 runs at 0.5 * (1 + cos(pi * 5 / 10)) = 0.5 of the base lr."""
    from voco.errors import VocoError
    from voco.train.loop import LoopConfig

    cfg = LoopConfig(steps=6, schedule_steps=10)
    assert cfg.horizon == 10 and LoopConfig(steps=6).horizon == 6
    with pytest.raises(VocoError, match="schedule_steps"):
        LoopConfig(steps=6, schedule_steps=5)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 6
    ref_model, ref_ema, _ = run_toy(tmp_path / "ref", steps=steps, noisy=True)

    out = tmp_path / "killed"
    cmd = [sys.executable, str(Path(__file__).resolve()), "toy", str(out), "--steps", str(steps)]
    proc = subprocess.Popen([*cmd, "--sleep", "0.5"], env=_child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if (out / "last.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    assert not (out / "final.pt").exists()
    killed_at = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step"]
    assert 2 <= killed_at < steps

    done = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out / 'last.pt'} at step {killed_at}" in done.stderr
    resumed = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    for name, ref in ref_model.state_dict().items():
        assert torch.equal(resumed["model"][name], ref), name
    for name, ref in ref_ema.module.state_dict().items():
        assert torch.equal(resumed["ema"]["module"][name], ref), name
    steps_logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # records past the checkpoint were dropped and redone


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    steps = 4
    single, _, _ = run_toy(tmp_path / "single", steps=steps, noisy=False)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), "ddp", str(out), "--steps", str(steps)]
    done = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp = _weights(out / "final.pt")
    ck = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    init = toy_model().state_dict()
    worst, moved = 0.0, 0.0
    for name, ref in single.state_dict().items():
        # float32 summation order differs between one batch of 4 and two all-reduced batches of 2; Adam turns that
        # ~1e-7 gradient noise into ~1e-6 weight differences, far below what training itself moved the weights
        assert torch.allclose(ddp[name], ref, rtol=1e-4, atol=1e-5), name
        worst = max(worst, float((ddp[name] - ref).abs().max()))
        moved = max(moved, float((ref - init[name]).abs().max()))
    assert moved > 100 * worst, (moved, worst)


# ---------------------------------------------------------------------------------------------------------- numerics
def _fp16_run(out, steps, max_bad_steps, loss_at):
    """The toy model with fp16 autocast + the real GradScaler, on CPU (the code path CUDA fp16 takes).

    ``loss_at(step, loss) -> loss``: turns the loss of some steps into a NaN or an overflowing one."""
    from voco.train.loop import LoopConfig, train

    torch.set_num_threads(1)
    model = toy_model()
    base = make_step(noisy=False)
    counter = {"step": 0}

    def step(net, batch):
        counter["step"] += 1
        out = dict(base(net, batch))
        out["total"] = loss_at(counter["step"], out["total"])
        return out

    cfg = LoopConfig(steps=steps, lr=3e-3, amp="fp16", checkpoint_every=2, seed=5, stage="toy", method="fp16",
                     max_bad_steps=max_bad_steps, log_every=1)
    return train(model, step, toy_batches, cfg, out, crops_per_step=B_GLOBAL)


def test_fp16_nan_loss_fails_loudly_and_writes_no_final(tmp_path):
    """From step 3 on the loss is NaN: with fp16 the GradScaler would skip every step and shrink its scale for ever;
    skipped steps count toward max_bad_steps, so the run fails naming the steps, and no final.pt is written."""
    from voco.errors import VocoError

    with pytest.raises(VocoError, match=r"steps skipped \(steps 3-6.*fp16 loss scale.*max_bad_steps 3") as info:
        _fp16_run(tmp_path, steps=20, max_bad_steps=3, loss_at=lambda s, v: v * float("nan") if s >= 3 else v)
    assert "final.pt was not written" in str(info.value)
    assert not (tmp_path / "final.pt").exists()
    ck = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 2 and ck["scaler"] is not None  # the last good state stays resumable
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_fp16_overflow_steps_are_skipped_counted_and_recovered_from(tmp_path):
    """A loss that overflows fp16 at the initial scale (2^16): the GradScaler skips those steps and halves its scale.
    Under max_bad_steps the run recovers and finishes with a lower scale; over it, the same run fails."""
    from voco.errors import VocoError

    def huge(step, loss):  # ~1e4 x a CE loss: gradients overflow fp16 until the scale is ~2^16 / 2^k
        return loss * 3e4

    res = _fp16_run(tmp_path / "ok", steps=24, max_bad_steps=20, loss_at=huge)
    assert res.step == 24 and (tmp_path / "ok" / "final.pt").is_file()
    ck = torch.load(tmp_path / "ok" / "final.pt", map_location="cpu", weights_only=True)
    assert ck["scaler"]["scale"] < 2.0**16  # the scaler really skipped (and halved) on overflow
    grads = [json.loads(x)["grad_norm"] for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(not np.isfinite(g) for g in grads)
    assert 1 <= skipped < 20, grads
    with pytest.raises(VocoError, match="max_bad_steps 1"):
        _fp16_run(tmp_path / "strict", steps=24, max_bad_steps=1, loss_at=huge)
    assert not (tmp_path / "strict" / "final.pt").exists()


def test_fp32_nan_loss_also_counts(tmp_path):
    from voco.errors import VocoError
    from voco.train.loop import LoopConfig, train

    base = make_step(noisy=False)

    def step(net, batch):
        out = dict(base(net, batch))
        out["total"] = out["total"] * float("nan")
        return out

    cfg = LoopConfig(steps=10, amp="off", seed=1, stage="toy", method="nan", max_bad_steps=2)
    with pytest.raises(VocoError, match="3 consecutive steps skipped"):
        train(toy_model(), step, toy_batches, cfg, tmp_path)
    assert not (tmp_path / "final.pt").exists()


def test_amp_dtype_by_device():
    from voco.train.loop import amp_dtype

    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None
    assert amp_dtype("fp16", cpu) == torch.float16 and amp_dtype("bf16", cpu) == torch.bfloat16


# ------------------------------------------------------------------------------------------------------ child script
def _main(argv: list[str]) -> int:
    import argparse
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["toy", "ddp"])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args(argv)
    if a.mode == "toy":
        from voco.errors import EXIT_INTERRUPTED, Interrupted

        try:
            run_toy(a.out, a.steps, noisy=True, sleep=a.sleep)
        except Interrupted as e:
            print(e, file=sys.stderr)
            return EXIT_INTERRUPTED
        return 0
    from voco.train import distributed as dist

    assert dist.init_distributed(), "expected torchrun's environment"
    try:
        run_toy(a.out, a.steps, noisy=False)
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
