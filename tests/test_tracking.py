"""Tracking views of a finished run: TensorBoard event files (read back with TensorBoard's own reader) and the files
the shipped dvc.yaml points DVC at (read back with `dvc metrics show --json` / `dvc plots show --json` in a temp copy
of the repository). metrics.jsonl stays the source of truth: every view must agree with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from voco.train.loop import LoopConfig, train
from voco.train.progress import read_metrics, tracking_paths

REPO = Path(__file__).resolve().parents[1]
RUN = Path("runs/finetune/toy/scratch/plain/nall-s0")


def _toy_run(out: Path, steps: int) -> None:
    """A real run of the shared training loop: a linear model fitting y = 2x."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)

    def step(m, batch):
        loss = ((m(batch["x"]) - 2 * batch["x"]) ** 2).mean()
        return {"total": loss, "mse": loss.detach(), "acc": (loss.detach() < 1).float()}

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [{"x": torch.randn(8, 1, generator=g)} for _ in range(4)]

    cfg = LoopConfig(steps=steps, lr=0.05, checkpoint_every=3, stage="finetune", method="plain", log_every=1)
    train(model, step, batches, cfg, out)


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    assert tag in acc.Tags()["scalars"], acc.Tags()["scalars"]
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_event_files_hold_every_step_once_after_a_resume(tmp_path):
    run = tmp_path / RUN
    _toy_run(run, 3)
    _toy_run(run, 6)  # resumes from final.pt at step 3
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    total = _scalars(run, "train/total")
    assert [s for s, _ in total] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in total] == pytest.approx([r["total"] for r in recs], rel=1e-6)
    assert [s for s, _ in _scalars(run, "train/lr")] == [1, 2, 3, 4, 5, 6]
    mpath, ppath = tracking_paths(run)
    assert mpath == tmp_path / "runs/tracking/metrics/finetune/toy/scratch/plain/nall-s0.json"
    rows = [line.split("\t") for line in ppath.read_text().splitlines()]
    assert rows[0][:2] == ["step", "epoch"] and "total" in rows[0] and len(rows) == 7
    assert json.loads(mpath.read_text())["step"] == 6


def test_tracking_paths_outside_the_runs_layout(tmp_path):
    assert tracking_paths(tmp_path / "elsewhere") == (tmp_path / "elsewhere/tracking/metrics.json",
                                                      tmp_path / "elsewhere/tracking/plots.tsv")
    assert tracking_paths(Path("runs/pretrain/default/ssl"))[1] == Path("runs/tracking/plots/pretrain/default/ssl.tsv")


@pytest.mark.slow
def test_dvc_reads_a_finished_run(tmp_path):
    """`dvc metrics show` / `dvc plots show` in a copy of the repository (its shipped dvc.yaml) after one run."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed (DVC needs it)")
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel, follow_symlinks=False)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def dvc(*args: str) -> str:
        r = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return r.stdout

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _toy_run(repo / RUN, 5)
    recs = read_metrics(repo / RUN / "metrics.jsonl")
    metrics = json.loads(dvc("metrics", "show", "--json"))
    ours = next(iter(metrics.values()))["data"]["runs/tracking/metrics/finetune/toy/scratch/plain/nall-s0.json"]["data"]
    assert ours["step"] == 5 and ours["total"] == pytest.approx(recs[-1]["total"])
    plots = json.loads(dvc("plots", "show", "--json"))
    key = "runs/tracking/plots/finetune/toy/scratch/plain/nall-s0.tsv"
    assert key in plots["data"], list(plots["data"])
    values = plots["data"][key][0]["content"]["data"]["values"]
    assert [int(v["step"]) for v in values] == [1, 2, 3, 4, 5]
    assert [float(v["total"]) for v in values] == pytest.approx([r["total"] for r in recs])
