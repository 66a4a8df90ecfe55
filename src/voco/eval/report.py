"""Paper-style report from evaluation summaries: tables (Markdown + CSV), label-efficiency and training curves (PNG).

Inputs (all optional except at least one summary):

* ``results/{dataset}/{init}/{method}/n{N}-s{seed}/summary.json`` written by ``voco evaluate``;
* ``runs/finetune/.../metrics.jsonl`` and ``transfer.json`` written by ``voco finetune``;
* ``results/leakage/report.json`` (leakage audit) and ``results/omni/*.json`` (pseudo-label quality).

Outputs in ``OUT`` (fixed names, so Snakemake can declare them): ``report.md``, ``table.csv`` (main table, long form),
``results.csv`` (every run), ``transfer.csv``, ``label_efficiency.png``, ``training_curves.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from voco.io import atomic_path, write_json

log = logging.getLogger(__name__)

OUTPUTS = ("report.md", "table.csv", "results.csv", "transfer.csv", "label_efficiency.png", "training_curves.png")
SEG_METRICS = ("dice", "dice_all_classes", "nsd", "hd95")
CLS_METRICS = ("auc", "accuracy")


# ------------------------------------------------------------------------------------------------ collecting
def n_key(n: Any) -> float:
    """Sort key / x position of an ``n_train`` value ("all" sorts last)."""
    try:
        return float(n)
    except (TypeError, ValueError):
        return math.inf


def collect_summaries(results: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per ``summary.json`` under ``results`` (dataset / init / method / n / seed / metrics)."""
    rows = []
    for p in sorted(Path(results).glob("*/*/*/n*-s*/summary.json")):
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable summary %s (%s)", p, e)
            continue
        row = {k: s.get(k) for k in ("dataset", "task", "init", "method", "n_train", "n_train_used", "seed", "split")}
        row["n_train"] = str(row["n_train"])
        row["path"] = str(p)
        row["train_seconds"] = s.get("train_seconds")
        row["eval_seconds"] = s.get("eval_seconds")
        row["primary_metric"] = s.get("primary", {}).get("name")
        row["primary"] = _num(s.get("primary", {}).get("value"))
        m = s.get("metrics", {})
        if s.get("task") == "classification":
            for k in CLS_METRICS:
                row[k] = _num(m.get(k))
        else:
            for space in ("original", "resampled"):
                mean = (m.get(space) or {}).get("mean") or {}
                for k in SEG_METRICS:
                    row[f"{k}_{space}"] = _num(mean.get(k))
                row[f"hd95_undefined_{space}"] = mean.get("hd95_undefined")
        rows.append(row)
    return pd.DataFrame(rows)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (nan for one value) and count of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def main_n(df: pd.DataFrame, dataset: str) -> str:
    """The N shown in the main table for a dataset: ``all`` if run, else the largest N."""
    ns = df.loc[df["dataset"] == dataset, "n_train"].unique().tolist()
    return max(ns, key=n_key) if ns else "all"


def main_table(
    df: pd.DataFrame, metric: str = "primary", baseline: tuple[str, str] = ("scratch", "plain")
) -> pd.DataFrame:
    """Long table: dataset, init, method, n_train, mean, sd, n_seeds, delta (vs the baseline init/method)."""
    rows = []
    for dataset in sorted(df["dataset"].unique()):
        n = main_n(df, dataset)
        sub = df[(df["dataset"] == dataset) & (df["n_train"] == n)]
        base = sub[(sub["init"] == baseline[0]) & (sub["method"] == baseline[1])]
        base_mean = mean_sd(base[metric].tolist())[0] if metric in sub else math.nan
        for (init, method), g in sub.groupby(["init", "method"], sort=False):
            mean, sd, k = mean_sd(g[metric].tolist()) if metric in g else (math.nan, math.nan, 0)
            rows.append({
                "dataset": dataset, "init": init, "method": method, "n_train": n, "metric": metric,
                "metric_name": str(g["primary_metric"].iloc[0]) if metric == "primary" else metric,
                "mean": mean, "sd": sd, "n_seeds": k, "delta": mean - base_mean,
            })
    return pd.DataFrame(rows)


def _fmt(mean: float, sd: float, delta: float | None = None, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    s = f"{mean:.{digits}f}"
    s += f" ± {sd:.{digits}f}" if np.isfinite(sd) else ""
    if delta is not None and np.isfinite(delta):
        s += f" ({delta:+.{digits}f})"
    return s


def init_order(inits: Sequence[str]) -> list[str]:
    pref = ["scratch", "ssl", "stage1", "stage2", "suprem", "file"]
    return sorted(inits, key=lambda i: (pref.index(i) if i in pref else len(pref), i))


def markdown_table(table: pd.DataFrame, with_delta: bool = True, digits: int = 3) -> str:
    """Rows init x method, columns datasets; cells mean ± sd over seeds (delta vs the baseline)."""
    if table.empty:
        return "_no results_\n"
    datasets = sorted(table["dataset"].unique())
    head = []
    for d in datasets:
        t = table[table["dataset"] == d]
        head.append(f"{d} ({t['metric_name'].iloc[0]}, N={t['n_train'].iloc[0]})")
    lines = ["| init | method | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(datasets)]
    keys = table[["init", "method"]].drop_duplicates()
    order = init_order(keys["init"].unique().tolist())
    for init in order:
        for method in sorted(keys[keys["init"] == init]["method"].unique(), key=lambda m: (m != "plain", m)):
            cells = []
            for d in datasets:
                r = table[(table["dataset"] == d) & (table["init"] == init) & (table["method"] == method)]
                if r.empty:
                    cells.append("–")
                    continue
                r = r.iloc[0]
                is_base = init == "scratch" and method == "plain"
                cells.append(_fmt(r["mean"], r["sd"], None if (is_base or not with_delta) else r["delta"], digits))
            lines.append(f"| {init} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ paired effects
ORDER_CLAIM = ("stage2", "ssl", "scratch")  # the paper's ordering: omni >= SSL >= scratch


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float, int]:
    """Mean, sample sd and the two-sided ``level`` t-interval of per-seed paired differences.

    Returns:
        (mean, sd, low, high, n); sd / low / high are nan for fewer than two differences.
    """
    from scipy import stats

    d = np.asarray([x for x in diffs if x is not None and np.isfinite(x)], dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    if d.size == 1:
        return float(d[0]), math.nan, math.nan, math.nan, 1
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1)) * sd / math.sqrt(d.size)
    return mean, sd, mean - half, mean + half, int(d.size)


def verdict(low: float, high: float, n: int) -> str:
    """Plain words for a paired interval: above 0, below 0, or containing 0 (inside the noise)."""
    if n < 2 or not (np.isfinite(low) and np.isfinite(high)):
        return "one seed: no interval"
    if low > 0:
        return "better (interval above 0)"
    if high < 0:
        return "worse (interval below 0)"
    return "inside the noise (interval contains 0)"


def paired_table(df: pd.DataFrame, baseline: tuple[str, str] = ("scratch", "plain"), metric: str = "primary",
                 level: float = 0.95) -> pd.DataFrame:
    """Every (dataset, N, init, method) against the baseline init/method at the same dataset, N and seed.

    Columns: dataset, n_train, init, method, metric_name, mean, sd, base_mean, base_sd, diff, diff_sd, ci_low,
    ci_high, n_pairs, verdict.
    """
    rows = []
    if df.empty:
        return pd.DataFrame(rows)
    for (dataset, n), sub in df.groupby(["dataset", "n_train"], sort=False):
        base = sub[(sub["init"] == baseline[0]) & (sub["method"] == baseline[1])].set_index("seed")[metric]
        if base.empty:
            continue
        for (init, method), g in sub.groupby(["init", "method"], sort=False):
            if (init, method) == baseline:
                continue
            vals = g.set_index("seed")[metric]
            seeds = sorted(set(vals.index) & set(base.index))
            diffs = [float(vals[s]) - float(base[s]) for s in seeds]
            d, dsd, lo, hi, k = paired_interval(diffs, level)
            m, sd, _ = mean_sd(vals.tolist())
            bm, bsd, _ = mean_sd(base.tolist())
            rows.append({"dataset": dataset, "n_train": n, "init": init, "method": method,
                         "metric_name": str(g["primary_metric"].iloc[0]) if metric == "primary" else metric,
                         "mean": m, "sd": sd, "base_mean": bm, "base_sd": bsd, "diff": d, "diff_sd": dsd,
                         "ci_low": lo, "ci_high": hi, "n_pairs": k, "verdict": verdict(lo, hi, k)})
    out = pd.DataFrame(rows)
    if not out.empty:
        out = out.sort_values(["dataset", "n_train", "init", "method"],
                              key=lambda c: c.map(n_key) if c.name == "n_train" else c).reset_index(drop=True)
    return out


def paired_md(table: pd.DataFrame, df: pd.DataFrame, baseline: tuple[str, str], digits: int = 3,
              level: float = 0.95) -> list[str]:
    """The pre-training effect section: per dataset and N, each init's mean ± sd, its paired difference to the
    baseline with a t-interval and a plain verdict; then whether the paper's ordering omni >= SSL >= scratch holds."""
    if table.empty:
        return []
    f = f"{{:.{digits}f}}"
    md = [f"## Does pre-training help? (paired by seed, {level:.0%} t-interval)", "",
          f"Each row: mean ± sd over seeds, the same for {baseline[0]}/{baseline[1]} at the same N, and the mean of the "
          "per-seed differences (same seed = same training cases and crop stream) with its interval. A difference "
          "whose interval contains 0 is inside the seed-to-seed noise: it is not evidence either way.", "",
          "| dataset | N | init | method | value | baseline | paired diff | interval | seeds | verdict |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        interval = f"[{f.format(r['ci_low'])}, {f.format(r['ci_high'])}]" if np.isfinite(r["ci_low"]) else "–"
        md.append(f"| {r['dataset']} ({r['metric_name']}) | {r['n_train']} | {r['init']} | {r['method']} | "
                  f"{_fmt(r['mean'], r['sd'], None, digits)} | {_fmt(r['base_mean'], r['base_sd'], None, digits)} | "
                  f"{r['diff']:+.{digits}f} | {interval} | {r['n_pairs']} | {r['verdict']} |")
    md.append("")
    claims = ordering_claims(df, digits)
    if claims:
        md += ["Paper ordering omni (stage2) >= SSL (ssl) >= scratch, by mean:", "", *claims, ""]
    return md


def ordering_claims(df: pd.DataFrame, digits: int = 3) -> list[str]:
    """One line per (dataset, N) that has stage2, ssl and scratch plain runs: the means and whether the order holds."""
    lines = []
    plain = df[df["method"] == "plain"]
    for (dataset, n), sub in plain.groupby(["dataset", "n_train"], sort=False):
        means = {i: mean_sd(sub.loc[sub["init"] == i, "primary"].tolist())[0] for i in ORDER_CLAIM}
        if not all(np.isfinite(v) for v in means.values()):
            continue
        holds = means["stage2"] >= means["ssl"] >= means["scratch"]
        vals = " >= ".join(f"{i} {means[i]:.{digits}f}" for i in ORDER_CLAIM)
        lines.append(f"- {dataset}, N={n}: {vals}: {'holds' if holds else 'does not hold'}")
    return lines


# ------------------------------------------------------------------------------------------------ runs side
def collect_transfer(runs: str | os.PathLike[str] | None) -> pd.DataFrame:
    """One row per (dataset, init) from ``runs/finetune/{dataset}/{init}/*/*/transfer.json``."""
    rows: dict[tuple[str, str], dict] = {}
    if runs is None:
        return pd.DataFrame()
    for p in sorted(Path(runs).glob("finetune/*/*/*/*/transfer.json")):
        dataset, init = p.parts[-5], p.parts[-4]
        if (dataset, init) in rows:
            continue
        try:
            t = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rows[(dataset, init)] = {
            "dataset": dataset, "init": init, "source": t.get("source", ""),
            "loaded": len(t.get("loaded", [])), "adapted": len(t.get("adapted", [])),
            "mismatched": len(t.get("mismatched", [])), "skipped": len(t.get("skipped", [])),
            "excluded": len(t.get("excluded", [])), "left_at_init": len(t.get("missing", [])),
            "layout": t.get("layout") or "", "encoder_loaded": (
                f"{t['encoder']['loaded']}/{t['encoder']['model']}" if (t.get("encoder") or {}).get("model") else ""),
        }
    return pd.DataFrame(list(rows.values()))


def read_metrics_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return pd.DataFrame(rows)


def _loss_column(df: pd.DataFrame) -> str | None:
    for k in ("dice_ce", "ce", "loss", "total", "loss/total", "train/loss"):
        if k in df.columns:
            return k
    cands = [c for c in df.columns if "loss" in c and pd.api.types.is_numeric_dtype(df[c])]
    return cands[0] if cands else None


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_label_efficiency(df: pd.DataFrame, out: Path) -> None:
    """Primary metric (mean ± sd over seeds) against the number of labelled training cases, one panel per dataset."""
    plt = _plt()
    datasets = sorted(df["dataset"].unique()) if not df.empty else []
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(4.5 * max(1, len(datasets)), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=False):
        sub = df[df["dataset"] == d]
        for (init, method), g in sub.groupby(["init", "method"]):
            pts = []
            for n, gn in g.groupby("n_train"):
                used = gn["n_train_used"].dropna()
                x = float(used.iloc[0]) if len(used) else n_key(n)
                m, s, _ = mean_sd(gn["primary"].tolist())
                pts.append((x, m, 0.0 if not np.isfinite(s) else s))
            pts.sort()
            xs, ms, ss = (np.array(v) for v in zip(*pts, strict=True))
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=f"{init}/{method}")
        ax.set_title(d)
        ax.set_xlabel("labelled training cases N")
        ax.set_ylabel(str(sub["primary_metric"].iloc[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_training_curves(runs: str | os.PathLike[str] | None, df: pd.DataFrame, out: Path) -> None:
    """Training loss against step for seed-0 runs at the main N, one panel per dataset, one line per init/method."""
    plt = _plt()
    datasets = sorted(df["dataset"].unique()) if not df.empty else []
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(4.5 * max(1, len(datasets)), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=False):
        n = main_n(df, d)
        sub = df[(df["dataset"] == d) & (df["n_train"] == n)]
        seed = sorted(sub["seed"].dropna().unique())[0] if len(sub) else 0
        ylabel = "loss"
        for (init, method), _g in sub.groupby(["init", "method"]):
            p = Path(runs or "runs") / "finetune" / d / init / method / f"n{n}-s{int(seed)}" / "metrics.jsonl"
            if not p.is_file():
                continue
            m = read_metrics_jsonl(p)
            col = _loss_column(m)
            if col is None or "step" not in m.columns:
                continue
            m = m.dropna(subset=[col])
            smooth = m[col].rolling(max(1, len(m) // 20), min_periods=1).mean()
            ax.plot(m["step"], smooth, label=f"{init}/{method}", lw=1)
            ylabel = col
        ax.set_title(f"{d} (N={n}, seed {int(seed)})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training {ylabel} (smoothed)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ extras
def _json_section(title: str, obj: Any, max_rows: int = 30) -> str:
    """Render a JSON document compactly: scalars as a list, lists of flat dicts / dicts of dicts as tables."""
    lines = [f"### {title}", ""]
    if isinstance(obj, dict):
        scalars = {k: v for k, v in obj.items() if not isinstance(v, dict | list)}
        for k, v in scalars.items():
            lines.append(f"- **{k}**: {v}")
        for k, v in obj.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                lines += ["", f"{k} ({len(v)} rows{', first ' + str(max_rows) if len(v) > max_rows else ''}):", ""]
                lines.append(_records_md(v[:max_rows]))
            elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                recs = [{"": kk, **{a: b for a, b in vv.items() if not isinstance(b, dict | list)}} for kk, vv in v.items()]
                lines += ["", f"{k}:", "", _records_md(recs[:max_rows])]
            elif isinstance(v, list | dict):
                lines.append(f"- **{k}**: {len(v)} entries")
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        lines.append(_records_md(obj[:max_rows]))
    else:
        lines.append(f"`{json.dumps(obj)[:500]}`")
    return "\n".join(lines) + "\n"


def _records_md(records: list[dict]) -> str:
    cols: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in cols and not isinstance(v, dict | list):
                cols.append(k)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        out.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ------------------------------------------------------------------------------------------------ main
def build_report(
    results: str | os.PathLike[str],
    out: str | os.PathLike[str],
    runs: str | os.PathLike[str] | None = None,
    baseline: tuple[str, str] = ("scratch", "plain"),
    digits: int = 3,
    datasets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write every report output into ``out``; returns a small summary (counts, main table records).

    ``datasets`` restricts the report to those datasets (the per-dataset report of ``evaluate_dataset``).
    """
    results, out = Path(results), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = collect_summaries(results)
    if datasets and not df.empty:
        df = df[df["dataset"].isin(list(datasets))].reset_index(drop=True)
    if df.empty:
        log.warning("no summary.json under %s: the report will say so", results)
    table = main_table(df, "primary", baseline) if not df.empty else pd.DataFrame()
    paired = paired_table(df, baseline)
    _write_csv(df, out / "results.csv")
    _write_csv(table, out / "table.csv")
    _write_csv(paired, out / "paired.csv")
    transfer = collect_transfer(runs)
    if datasets and not transfer.empty:
        transfer = transfer[transfer["dataset"].isin(list(datasets))]
    _write_csv(transfer, out / "transfer.csv")
    plot_label_efficiency(df, out / "label_efficiency.png")
    plot_training_curves(runs, df, out / "training_curves.png")

    md = ["# voco downstream report", ""]
    if df.empty:
        md += [f"No evaluation summaries were found under `{results}`.", ""]
    else:
        seeds = sorted(df["seed"].dropna().unique().tolist())
        md += [
            f"{len(df)} evaluated runs; datasets: {', '.join(sorted(df['dataset'].unique()))}; seeds: {seeds}.",
            f"Cells: mean ± sample sd over seeds (delta vs {baseline[0]}/{baseline[1]} in brackets). Segmentation:",
            "Dice (mean over the foreground classes present in the truth) in the original image geometry;",
            "classification: AUC.",
            "",
            "## Main table",
            "",
            markdown_table(table, digits=digits),
        ]
        md += paired_md(paired, df, baseline, digits)
        md += _secondary_tables(df, baseline, digits)
        md += ["## Label efficiency", "", "![label efficiency](label_efficiency.png)", ""]
        md += _label_efficiency_md(df, digits)
        md += ["## Training curves", "", "![training curves](training_curves.png)", ""]
        md += _timing_md(df)
    if not transfer.empty:
        md += ["## Transfer reports (tensors per init)", "", _records_md(transfer.to_dict("records")), ""]
    leak = results / "leakage" / "report.json"
    if leak.is_file() and not datasets:
        md += ["## Leakage audit", "", _json_section(str(leak), json.loads(leak.read_text())), ""]
    if runs is not None and not datasets:
        md += pretraining_md(Path(runs), digits)
    omni = sorted((results / "omni").glob("*.json")) if (results / "omni").is_dir() and not datasets else []
    if omni:
        md += ["## Pseudo-label quality (omni)", ""]
        md += omni_quality_md(omni, digits)
        md += stage2_crops_md(Path(runs)) if runs is not None else []
        md += ["### Details", ""]
        for p in omni:
            try:
                md += [_json_section(p.name, json.loads(p.read_text())), ""]
            except ValueError:
                continue
    md += _notes_md()
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(md))
    summary = {"runs": len(df), "table": table.to_dict("records") if not table.empty else []}
    write_json(out / "report.json", summary)
    return summary


def pretraining_md(runs: Path, digits: int = 3, last: int = 30) -> list[str]:
    """VoCo pretext position accuracy of every SSL run under ``runs/pretrain/*/ssl`` (mean of the last ``last`` steps,
    against chance 1/n), the live signal that the pretext task is learned."""
    rows = []
    for p in sorted(runs.glob("pretrain/*/ssl/metrics.jsonl")):
        m = read_metrics_jsonl(p)
        if m.empty or "acc" not in m:
            continue
        acc = m["acc"].dropna()
        summ = {}
        if (p.parent / "summary.json").is_file():
            try:
                summ = json.loads((p.parent / "summary.json").read_text())
            except ValueError:
                summ = {}
        rows.append({"run": p.parent.parent.name, "method": summ.get("method", ""), "steps": int(m["step"].max()),
                     f"accuracy, last {last} steps": round(float(acc.tail(last).mean()), digits),
                     f"accuracy, first {last} steps": round(float(acc.head(last).mean()), digits),
                     "chance": round(float(summ["chance"]), digits) if summ.get("chance") else ""})
    if not rows:
        return []
    return ["## Pre-training", "", "VoCo pretext position accuracy (argmax of the predicted overlaps = the base crop "
            "that overlaps most):", "", _records_md(rows), ""]


def stage2_crops_md(runs: Path) -> list[str]:
    """How many stage-2 crops came from pseudo-labels (from ``runs/pretrain/*/stage2/summary.json``)."""
    lines = []
    for p in sorted(runs.glob("pretrain/*/stage2/summary.json")):
        try:
            s = json.loads(p.read_text())
        except ValueError:
            continue
        pseudo = s.get("pseudo") or {}
        lab, ps = int(s.get("labelled_crops") or 0), int(pseudo.get("crops") or 0)
        share = f" ({ps / (lab + ps):.0%} of the supervised crops)" if lab + ps else ""
        mode = s.get("stage2_pseudo")
        if mode == "online":
            lines.append(f"- stage 2 ({p.parent.parent.name}): online pseudo-labels on the SSL crops; "
                         f"{lab} labelled crops over {s.get('stage_steps')} steps")
        else:
            lines.append(f"- stage 2 ({p.parent.parent.name}): {ps} pseudo-labelled crops from "
                         f"{pseudo.get('volumes', 0)} kept volumes{share} and {lab} labelled crops over "
                         f"{s.get('stage_steps')} steps")
    return [*lines, ""] if lines else []


def omni_quality_md(paths: Sequence[Path], digits: int = 3) -> list[str]:
    """Headline table: Dice against the phantom's full truth of the VoComni-completed labels and of the pseudo-labels.

    Reads ``curation.json`` (voco vocomni) and ``pseudo_<dataset>.json`` (voco pseudolabel --merge). Pseudo-label Dice
    is over the classes the stage-1 model was trained on (every truth class as a second column), with the
    confidence-threshold sweep it was chosen from.
    """
    rows: list[dict[str, Any]] = []
    sweeps: list[tuple[str, list[dict]]] = []
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict):
            continue
        if p.name == "curation.json":
            dice = d.get("dice", {}) if isinstance(d.get("dice"), dict) else {}
            rows.append({
                "labels": "VoComni completion (filled classes)", "dataset": ", ".join(d.get("sources", {}) or []),
                "volumes": d.get("volumes"), "kept": d.get("kept"),
                "dice_vs_full_truth": dice.get("completed_filled_mean"),
                "dice_given_classes": dice.get("completed_given_mean"),
                "dice_without_completion": dice.get("partial_filled_mean"),
            })
        elif p.name.startswith("pseudo_"):
            trained = d.get("dice_mean_trained_classes")
            rows.append({
                "labels": "stage-1 pseudo-labels" + (" (trained classes)" if trained is not None else ""),
                "dataset": d.get("dataset", p.stem[len("pseudo_"):]),
                "volumes": d.get("cases"), "kept": d.get("kept"),
                "dice_vs_full_truth": trained if trained is not None else d.get("dice_mean"),
                "dice_kept": d.get("dice_mean_trained_classes_kept"),
                "dice_every_truth_class": d.get("dice_mean") if trained is not None else None,
                "confidence": d.get("confidence_mean"), "threshold": d.get("min_confidence"),
            })
            sweeps.append((rows[-1]["dataset"], d.get("threshold_sweep") or []))
    if not rows:
        return []
    cols = ["labels", "dataset", "volumes", "kept", "dice_vs_full_truth", "dice_kept", "dice_given_classes",
            "dice_without_completion", "dice_every_truth_class", "confidence", "threshold"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.{digits}f}" if isinstance(v, float) else ("–" if v is None else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for dataset, sweep in sweeps:
        if not sweep:
            continue
        out += [f"Pseudo-label confidence threshold ({dataset}): volumes kept and their mean Dice vs the full truth "
                "(trained classes) per threshold; the configured threshold is chosen from this measurement.", "",
                _records_md(sweep), ""]
    return out


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _secondary_tables(df: pd.DataFrame, baseline: tuple[str, str], digits: int) -> list[str]:
    md: list[str] = []
    seg = df[df["task"] != "classification"]
    if not seg.empty:
        for col, title in [
            ("dice_all_classes_original", "Dice with every class scored (original geometry; a class absent from the "
                                          "truth counts 1 if not predicted, 0 if predicted)"),
            ("nsd_original", "NSD (original geometry)"),
            ("hd95_original", "HD95 in mm (original geometry; lower is better; undefined cases left out)"),
            ("dice_resampled", "Dice (resampled space)"),
        ]:
            if col in seg and seg[col].notna().any():
                t = main_table(seg, col, baseline)
                t["metric_name"] = col
                md += [f"### {title}", "", markdown_table(t, digits=digits), ""]
    cls = df[df["task"] == "classification"]
    if not cls.empty and "accuracy" in cls:
        t = main_table(cls, "accuracy", baseline)
        t["metric_name"] = "accuracy"
        md += ["### Classification accuracy", "", markdown_table(t, digits=digits), ""]
    return md


def _label_efficiency_md(df: pd.DataFrame, digits: int) -> list[str]:
    if df["n_train"].nunique() < 2:
        return []
    rows = []
    for (d, init, method, n), g in df.groupby(["dataset", "init", "method", "n_train"]):
        m, s, k = mean_sd(g["primary"].tolist())
        rows.append({"dataset": d, "init": init, "method": method, "N": n, "value": _fmt(m, s, None, digits), "seeds": k})
    rows.sort(key=lambda r: (r["dataset"], r["init"], r["method"], n_key(r["N"])))
    return [_records_md(rows), ""]


def _timing_md(df: pd.DataFrame) -> list[str]:
    if "train_seconds" not in df or df["train_seconds"].isna().all():
        return []
    rows = []
    for (d, method), g in df.groupby(["dataset", "method"]):
        t, _, k = mean_sd(g["train_seconds"].astype(float).tolist())
        e, _, _ = mean_sd(g["eval_seconds"].astype(float).tolist())
        rows.append({"dataset": d, "method": method, "runs": k, "train s/run": round(t, 1), "eval s/run": round(e, 1)})
    return ["## Cost per run", "", _records_md(rows), ""]


def _notes_md() -> list[str]:
    return [
        "## Notes",
        "",
        "- Dice (headline) scores a class only where it is present in the ground truth (MONAI `DiceMetric`",
        "  `ignore_empty=True`, as the paper's code); `dice_all_classes` scores every class (1 when prediction and",
        "  truth are both empty, 0 for a prediction of an absent class). HD95 is undefined (left out of means, counted",
        "  in `hd95_undefined_*` in results.csv) when exactly one of them is empty; NSD counts surface voxels.",
        "- Numbers come from the configuration that produced them (laptop demo: tiny CNN, coarse spacing, few steps);",
        "  they are not the paper's and are reported as measured.",
        "",
    ]
