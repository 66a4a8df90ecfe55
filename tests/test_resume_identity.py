"""Resume identity (issue 13, item 4): a checkpoint whose recorded settings or init differ from the job's is never
resumed silently: the job names what differs and starts afresh, removing what an earlier run left in its run folder
(only voco's own files, only there). Unchanged settings resume exactly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_finetune import _phantom_store
from test_pretrain import _override, make_store

from voco.cli import main as voco

FINETUNE_OUTPUTS = ["metrics.jsonl", "model.pt", "progress.png", "run.json", "transfer.json"]



def _outputs(run) -> list[str]:
    """The files of a run folder, without its TensorBoard event files (their names carry a time and a pid) and tracking folder."""
    return sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents.") and p.name != "tracking")

def _steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _sigterm_after(metrics: Path, n: int) -> threading.Thread:
    """Send this process a real SIGTERM once ``metrics`` has ``n`` records (the in-process training stops on it)."""

    def run() -> None:
        deadline = time.monotonic() + 120
        while len(_steps(metrics)) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _ck(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------- pre-training (SSL)
@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("prep")
    return [make_store(base / "abd", "abd", "abdomen", 4, 0), make_store(base / "chest", "chest", "chest", 2, 1)]


@pytest.mark.slow
def test_changed_config_value_starts_afresh_naming_the_key(tmp_path, stores, caplog):
    out = tmp_path / "ssl"

    def run(**pretrain) -> int:
        ov = tmp_path / f"ov{len(list(tmp_path.glob('ov*')))}"
        ov.mkdir()
        return voco(["pretrain", "--method", "voco", "--prep", *map(str, stores), "--out", str(out), "--steps", "3",
                     "--override", str(_override(ov, **pretrain))])

    assert run() == 0
    first = (out / "metrics.jsonl").read_bytes()

    # unchanged, or changed only in how the run is carried out (logging, checkpoint interval, loader workers): reused
    with caplog.at_level("INFO"):
        assert run(log_every=7, checkpoint_every=5) == 0
    assert "already complete" in caplog.text and "starting afresh" not in caplog.text
    assert (out / "metrics.jsonl").read_bytes() == first

    # a value that changes what is computed: the old run is not reused, and the message names the key
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run(lr=2e-3) == 0
    assert "holds a checkpoint of another run; starting afresh" in caplog.text
    assert "loop.lr: 0.001 -> 0.002" in caplog.text
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[0]["lr"] == pytest.approx(2e-3)
    assert _ck(out / "final.pt")["identity"]["config"]["loop"]["lr"] == pytest.approx(2e-3)
    assert _outputs(out) == ["backbone.pt", "final.pt", "metrics.jsonl", "progress.png",
                                                      "summary.json"]


def test_identity_diff_names_keys_and_checksums():
    from voco.train.checkpoint import identity_diff

    old = {"config": {"loop": {"lr": 1e-3, "steps": 10}, "model": {"name": "cnn_small"}},
           "init": {"sha256": "a" * 64, "path": "/x/backbone.pt"}, "data": {"abd": {"sha256": "c" * 64}}}
    same_file_moved = json.loads(json.dumps(old))
    same_file_moved["init"]["path"] = "/elsewhere/backbone.pt"
    assert identity_diff(old, same_file_moved) == []  # compared by content, not by path
    new = json.loads(json.dumps(old))
    new["config"]["loop"]["lr"] = 2e-3
    new["config"]["model"]["feature_size"] = 8
    new["init"]["sha256"] = "b" * 64
    assert identity_diff(old, new) == ["config.loop.lr: 0.001 -> 0.002", "config.model.feature_size: '<absent>' -> 8",
                                       "init checksum aaaaaaaaaaaa -> bbbbbbbbbbbb"]
    assert "no run identity" in identity_diff(None, new)[0]


def test_fresh_start_removes_only_voco_files_of_the_run_folder(tmp_path):
    from voco.train.checkpoint import RUN_FILES, prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    for name in RUN_FILES:
        (run / name).write_text("old")
    (run / ".last.pt.abc123.tmp.pt").write_text("torn")  # an atomic write killed mid-way
    (run / "notes.txt").write_text("mine")
    (run / "sub").mkdir()
    (run / "sub" / "metrics.jsonl").write_text("not the run's")
    outside = tmp_path / "metrics.jsonl"
    outside.write_text("outside")
    path, state = prepare_run_dir(run, {"config": {}}, "ssl", "voco")  # every checkpoint unreadable: afresh
    assert path is None and state is None
    assert _outputs(run) == ["notes.txt", "sub"]
    assert (run / "sub" / "metrics.jsonl").read_text() == "not the run's" and outside.read_text() == "outside"


# ------------------------------------------------------------------------------------------------------ fine-tuning
@pytest.fixture(scope="module")
def organs(tmp_path_factory):
    return _phantom_store(tmp_path_factory, "phantom_organs", 5)


def _init_file(path: Path, seed: int) -> Path:
    from voco.models import build_model

    torch.manual_seed(seed)
    torch.save(build_model("cnn_small", 1, 2).state_dict(), path)
    return path


def _finetune(organs, out: Path, init: Path, steps: int, tmp_path: Path) -> int:
    ov = tmp_path / "ft.yaml"
    ov.write_text(yaml.safe_dump({"finetune": {"checkpoint_every": 1000, "log_every": 1}}))
    return voco(["finetune", "--dataset", "phantom_organs", "--init", "file", "--init-path", str(init), "--n-train",
                 "2", "--seed", "3", "--prep", str(organs / "prep"), "--out", str(out), "--steps", str(steps),
                 "--override", str(ov), "--device", "cpu"])


@pytest.mark.slow
def test_unchanged_finetuning_resumes_exactly(organs, tmp_path, caplog):
    init = _init_file(tmp_path / "backbone.pt", 0)
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _finetune(organs, ref, init, 30, tmp_path) == 0
    t = _sigterm_after(out / "metrics.jsonl", 3)
    assert _finetune(organs, out, init, 30, tmp_path) == 75
    t.join()
    stopped = _ck(out / "last.pt")["step"]
    assert 3 <= stopped < 30 and not (out / "model.pt").exists()
    with caplog.at_level("INFO"):
        assert _finetune(organs, out, init, 30, tmp_path) == 0
    assert f"resuming from {out / 'last.pt'} at step {stopped}" in caplog.text
    a, b = _ck(ref / "model.pt")["model"], _ck(out / "model.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _outputs(out) == FINETUNE_OUTPUTS  # no checkpoint left beside the outputs
    caplog.clear()
    with caplog.at_level("INFO"):  # a finished run with the same identity is not redone
        assert _finetune(organs, out, init, 30, tmp_path) == 0
    assert "already complete" in caplog.text


@pytest.mark.slow
def test_changed_init_file_starts_finetuning_afresh(organs, tmp_path, caplog):
    """The issue-13 scenario: the init was re-trained while a fine-tuning run of the old init was interrupted. The job
    must not continue the old run: it names the init checksum change, starts at step 1 and leaves exactly its
    outputs (a run folder of an older voco, with a final.pt that records no identity, is not reused either)."""
    from voco.io import sha256_file

    init = _init_file(tmp_path / "backbone.pt", 0)
    out = tmp_path / "run"
    t = _sigterm_after(out / "metrics.jsonl", 2)
    assert _finetune(organs, out, init, 200, tmp_path) == 75  # interrupted: last.pt of the old init
    t.join()
    old_sha = sha256_file(init)
    assert _ck(out / "last.pt")["identity"]["init"]["sha256"] == old_sha
    (out / "notes.txt").write_text("a user's file")

    _init_file(init, 1)  # the pre-training was re-run: same path, new weights
    new_sha = sha256_file(init)
    with caplog.at_level("INFO"):
        assert _finetune(organs, out, init, 4, tmp_path) == 0
    assert f"init checksum {old_sha[:12]} -> {new_sha[:12]}" in caplog.text
    assert "starting from scratch: removed" in caplog.text
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]
    run = json.loads((out / "run.json").read_text())
    assert run["init_sha256"] == new_sha and run["identity"]["init"]["sha256"] == new_sha
    assert _outputs(out) == sorted([*FINETUNE_OUTPUTS, "notes.txt"])

    # a folder an older voco left: final.pt without a recorded identity, outputs removed by Snakemake
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"model": {}, "step": 4, "stage": "finetune", "method": "plain"}, legacy / "final.pt")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert _finetune(organs, legacy, init, 4, tmp_path) == 0
    assert "records no run identity" in caplog.text
    assert _outputs(legacy) == FINETUNE_OUTPUTS
    assert _steps(legacy / "metrics.jsonl") == [1, 2, 3, 4]
