"""One case, one verdict (issue 14): a case that cannot be read or processed is recorded with the exception's type,
message and file, and the job goes on, in pseudo-labelling and in evaluation (preprocess and convert: their own
test files)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from voco.cli import main as voco
from voco.data.store import Store


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_pseudolabel_a_broken_volume_is_rejected_and_the_shard_goes_on(tmp_path):
    from test_vocomni import make_store

    from voco.models import build_model
    from voco.omni.pseudolabel import merge, run_shard

    prep = make_store(tmp_path / "prep", "pool", {0: "background"}, 3, seed=1, labelled=False)
    broken = "pool_001"
    _truncate(prep / Store(prep).row(broken)["image"])
    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 3, feature_size=4)
    out = tmp_path / "pseudo"
    df = run_shard(model, prep, out, ["background", "liver", "spleen"], [16, 16, 16], shard=0, num_shards=1)
    rows = df.set_index("case_id")
    assert list(rows.index) == ["pool_000", "pool_001", "pool_002"]
    assert rows.loc[broken, "status"] == "rejected"
    assert rows.loc[broken, "reason"].startswith("DataError: ") and "cannot read stored arrays" in rows.loc[
        broken, "reason"]
    assert list(rows.loc[["pool_000", "pool_002"], "status"]) == ["ok", "ok"]
    assert not (out / "shard-0" / "cases" / broken).exists()
    # the merge re-applies the confidence threshold but keeps the failure's own reason
    summary = merge(out, 1, min_confidence=0.0)
    merged = pd.read_parquet(out / "manifest.parquet").set_index("case_id")
    assert merged.loc[broken, "status"] == "rejected" and merged.loc[broken, "reason"] == rows.loc[broken, "reason"]
    assert summary["kept"] == 2 and summary["dropped_cases"] == [broken]
    assert Store(out).ids() == ["pool_000", "pool_002"]


@pytest.fixture(scope="module")
def organs_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("organs")
    assert voco(["synth", "--dataset", "phantom_organs", "--out", str(root / "raw"), "--n-cases", "8"]) == 0
    assert voco(["preprocess", "--dataset-json", str(root / "raw" / "dataset.json"), "--out", str(root / "prep"),
                 "--dataset", "phantom_organs"]) == 0
    assert voco(["finetune", "--dataset", "phantom_organs", "--init", "scratch", "--prep", str(root / "prep"),
                 "--out", str(root / "run"), "--steps", "2", "--seed", "0"]) == 0
    return root


def test_evaluate_a_broken_case_is_recorded_and_the_others_are_scored(organs_run, tmp_path):
    root = organs_run
    record = json.loads((root / "run" / "run.json").read_text())
    ids = record[f"{record['eval_split']}_ids"]
    assert len(ids) >= 2, ids
    # a copy of the store with one evaluation case's stored image broken
    import shutil

    prep = tmp_path / "prep"
    shutil.copytree(root / "prep", prep)
    _truncate(prep / Store(prep).row(ids[0])["image"])
    out = tmp_path / "res"
    assert voco(["evaluate", "--dataset", "phantom_organs", "--run", str(root / "run"), "--prep", str(prep),
                 "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_failed"] == 1 and s["n_cases"] == len(ids) - 1
    assert s["failed"][0]["case_id"] == ids[0]
    assert s["failed"][0]["reason"].startswith("DataError: ") and ids[0] in s["failed"][0]["reason"]
    cases = pd.read_csv(out / "cases.csv")
    assert sorted(set(cases["case_id"])) == sorted(ids[1:])
    assert np.isfinite(s["primary"]["value"])
    # every case broken: that is the job's failure, with the reasons named
    for cid in ids[1:]:
        _truncate(prep / Store(prep).row(cid)["image"])
    assert voco(["evaluate", "--dataset", "phantom_organs", "--run", str(root / "run"), "--prep", str(prep),
                 "--out", str(tmp_path / "res2")]) == 2
    assert not (tmp_path / "res2" / "summary.json").exists()
