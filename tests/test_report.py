"""The report: tables from known summaries (mean, sd, delta), plots, extra sections; the downstream run grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from voco.cli import main as voco
from voco.eval import plan
from voco.eval.report import build_report, mean_sd


def _summary(root: Path, dataset, init, method, n, seed, value, task="segmentation", n_used=None):
    d = root / dataset / init / method / f"n{n}-s{seed}"
    d.mkdir(parents=True)
    s = {"dataset": dataset, "task": task, "init": init, "method": method, "n_train": n,
         "n_train_used": n_used if n_used is not None else (8 if n == "all" else n), "seed": seed, "split": "test",
         "train_seconds": 10.0 + seed, "eval_seconds": 2.0}
    if task == "classification":
        s["metrics"] = {"accuracy": value, "auc": value}
        s["primary"] = {"name": "auc", "value": value}
    else:
        mean = {"dice": value, "hd95": 10 * value, "nsd": value / 2, "hd95_undefined": 0}
        s["metrics"] = {"resampled": {"mean": mean}, "original": {"mean": mean}}
        s["primary"] = {"name": "dice", "space": "original", "value": value}
    (d / "summary.json").write_text(json.dumps(s))


def _run_files(runs: Path, dataset, init, method, n, seed):
    d = runs / "finetune" / dataset / init / method / f"n{n}-s{seed}"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "total": 1.0 / s}) + "\n" for s in range(1, 11)))
    (d / "transfer.json").write_text(json.dumps({"source": "x.pt", "loaded": ["a", "b"], "skipped": ["p"],
                                                 "mismatched": [], "excluded": ["out.weight"], "missing": ["out.weight"]}))


@pytest.fixture
def results(tmp_path):
    res, runs = tmp_path / "results", tmp_path / "runs"
    vals = {("scratch", "plain"): [0.50, 0.60], ("stage2", "plain"): [0.70, 0.80], ("stage2", "medcontext"): [0.75, 0.85]}
    for (init, method), vs in vals.items():
        for seed, v in enumerate(vs):
            _summary(res, "organs", init, method, "all", seed, v)
            _run_files(runs, "organs", init, method, "all", seed)
            _summary(res, "organs", init, method, 2, seed, v - 0.3)
    for seed, v in enumerate([0.6, 0.8]):
        _summary(res, "cls", "scratch", "plain", "all", seed, v, task="classification")
        _summary(res, "cls", "stage2", "plain", "all", seed, v + 0.1, task="classification")
    (res / "leakage").mkdir()
    (res / "leakage" / "report.json").write_text(json.dumps({"overlapping_cases": 0, "pairs": [{"a": "x", "b": "y"}]}))
    (res / "omni").mkdir()
    (res / "omni" / "pseudo_quality.json").write_text(json.dumps({"classes": {"liver": {"dice": 0.9}}, "kept": 10}))
    return res, runs


def test_mean_sd():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    m, s, k = mean_sd([1.0, float("nan")])
    assert (m, k) == (1.0, 1) and math.isnan(s)


def test_report_tables_plots_and_sections(results, tmp_path):
    res, runs = results
    out = tmp_path / "report"
    build_report(res, out, runs)
    for f in ("report.md", "table.csv", "results.csv", "transfer.csv"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    import matplotlib.image as mpimg

    for f in ("label_efficiency.png", "training_curves.png"):  # real images with something drawn on them
        img = mpimg.imread(out / f)
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].std()) > 0.01, f"{f} is blank"
    table = pd.read_csv(out / "table.csv")
    row = table[(table.dataset == "organs") & (table.init == "stage2") & (table.method == "plain")].iloc[0]
    assert row["n_train"] == "all"  # the main table shows N = all
    assert row["mean"] == pytest.approx(0.75)
    assert row["sd"] == pytest.approx(math.sqrt(0.005))
    assert row["delta"] == pytest.approx(0.75 - 0.55)  # vs scratch / plain
    cls = table[(table.dataset == "cls") & (table.init == "stage2")].iloc[0]
    assert cls["metric_name"] == "auc" and cls["delta"] == pytest.approx(0.1)
    md = (out / "report.md").read_text()
    assert "| stage2 | medcontext | " in md and "0.800 ± 0.071 (+0.250)" in md
    assert "| scratch | plain | " in md and "0.550 ± 0.071 |" in md  # the baseline row carries no delta
    assert "## Leakage audit" in md and "overlapping_cases" in md
    assert "## Pseudo-label quality" in md and "liver" in md
    assert "## Label efficiency" in md and "## Transfer reports" in md
    transfer = pd.read_csv(out / "transfer.csv")
    assert set(transfer["loaded"]) == {2} and set(transfer["init"]) == {"scratch", "stage2"}


def test_report_command_and_dataset_filter(results, tmp_path):
    res, runs = results
    out = tmp_path / "only_cls"
    assert voco(["report", "--results", str(res), "--runs", str(runs), "--out", str(out), "--dataset", "cls"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert set(table["dataset"]) == {"cls"}
    assert "Leakage" not in (out / "report.md").read_text()


def test_report_without_results(tmp_path):
    build_report(tmp_path / "none", tmp_path / "out")
    assert "No evaluation summaries" in (tmp_path / "out" / "report.md").read_text()


def test_plan_grid_and_paths():
    cfg = {"paths": {"runs": "runs", "results": "results"},
           "finetune": {"inits": ["scratch", "stage2"], "methods": ["plain"], "medcontext_datasets": ["organs"],
                        "n_train": [2, "all"], "seeds": [0, 1], "pretrain_run": "default"}}
    cards = {"organs": {"task": "segmentation"}, "cls": {"task": "classification"}, "pool": {"task": "none"}}
    runs = plan.runs(cfg, cards, ["organs", "cls", "pool"])
    assert len([r for r in runs if r[0] == "organs"]) == 2 * 2 * 2 * 2  # inits x methods(+medcontext) x N x seeds
    assert {r[2] for r in runs if r[0] == "cls"} == {"plain"}
    assert not [r for r in runs if r[0] == "pool"]
    assert plan.summaries(cfg, cards, ["cls"])[0] == "results/cls/scratch/plain/n2-s0/summary.json"
    assert plan.init_checkpoint(cfg, "stage2") == ["runs/pretrain/default/stage2/backbone.pt"]
    assert plan.init_checkpoint(cfg, "scratch") == []
    # a card may narrow its own grid (inits / n_train / seeds)
    cards["cls"] = {"task": "classification", "finetune": {"n_train": ["all"], "seeds": [0, 1, 2]}}
    cls_runs = [r for r in plan.runs(cfg, cards, ["cls"])]
    assert {r[3] for r in cls_runs} == {"all"} and {r[4] for r in cls_runs} == {0, 1, 2} and len(cls_runs) == 2 * 3
    # ... below the user's overrides, as every key (precedence card < user override < flag)
    from voco.config import Config

    resolved = Config(cfg, user={"finetune": {"seeds": [5]}})
    assert {r[4] for r in plan.runs(resolved, cards, ["cls"])} == {5}


def test_omni_quality_table_shows_dice_against_full_truth(tmp_path):
    from voco.eval.report import omni_quality_md

    (tmp_path / "curation.json").write_text(json.dumps({
        "sources": {"src_a": 8}, "volumes": 8, "kept": 7,
        "dice": {"completed_filled_mean": 0.41, "completed_given_mean": 1.0, "partial_filled_mean": 0.0}}))
    (tmp_path / "pseudo_pool.json").write_text(json.dumps(
        {"dataset": "pool", "cases": 5, "kept": 3, "dice_mean": 0.27, "confidence_mean": 0.6}))
    md = "\n".join(omni_quality_md(sorted(tmp_path.glob("*.json"))))
    assert "VoComni completion" in md and "0.410" in md and "1.000" in md
    assert "stage-1 pseudo-labels" in md and "| pool | 5 | 3 | 0.270" in md


def test_paired_interval_and_verdict_written_out():
    from voco.eval.report import paired_interval, verdict

    # diffs 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.3027 -> half-width 4.3027 * 0.1 / sqrt(3) = 0.2484
    m, sd, lo, hi, n = paired_interval([0.1, 0.2, 0.3])
    assert (m, n) == (pytest.approx(0.2), 3) and sd == pytest.approx(0.1)
    assert lo == pytest.approx(0.2 - 0.24841, abs=1e-4) and hi == pytest.approx(0.2 + 0.24841, abs=1e-4)
    assert verdict(lo, hi, n).startswith("inside the noise")
    m, sd, lo, hi, n = paired_interval([0.05, 0.06, 0.07])  # half-width 4.3027 * 0.01 / sqrt(3) = 0.0248
    assert lo == pytest.approx(0.06 - 0.02484, abs=1e-4) and verdict(lo, hi, n).startswith("better")
    assert verdict(*paired_interval([-0.05, -0.06, -0.07])[2:]).startswith("worse")
    assert verdict(*paired_interval([0.1])[2:]) == "one seed: no interval"


def test_report_pairs_inits_by_seed_and_states_the_ordering(tmp_path):
    res = tmp_path / "results"
    vals = {"scratch": [0.40, 0.50, 0.45], "ssl": [0.46, 0.55, 0.51], "stage2": [0.60, 0.52, 0.70]}
    for init, vs in vals.items():
        for seed, v in enumerate(vs):
            _summary(res, "organs", init, "plain", 2, seed, v)
    out = tmp_path / "report"
    build_report(res, out)
    paired = pd.read_csv(out / "paired.csv")
    ssl = paired[paired.init == "ssl"].iloc[0]
    assert ssl["diff"] == pytest.approx(0.0566667) and ssl["n_pairs"] == 3
    assert ssl["verdict"].startswith("better")  # diffs 0.06, 0.05, 0.06: tight interval above 0
    st2 = paired[paired.init == "stage2"].iloc[0]
    assert st2["diff"] == pytest.approx((0.2 + 0.02 + 0.25) / 3)
    assert st2["verdict"].startswith("inside the noise")  # diffs 0.20, 0.02, 0.25: the interval contains 0
    md = (out / "report.md").read_text()
    assert "## Does pre-training help? (paired by seed, 95% t-interval)" in md
    assert "inside the noise (interval contains 0)" in md
    assert "- organs, N=2: stage2 0.607 >= ssl 0.507 >= scratch 0.450: holds" in md
