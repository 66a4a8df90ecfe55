"""Paper-scale DAG benchmark: ``snakemake -n`` over a generated 160,000-case corpus.

What it builds (in a temporary working directory, nothing in the repository changes):

* the paper experiment (``config/experiments/paper.yaml``): its pre-training and downstream cards, their real ids;
* for every dataset, ``data/raw/<id>/SOURCE.json`` and ``data/nifti/<id>/dataset.json`` as the convert step would
  leave them, the cases split over the pre-training datasets in proportion to the cards' expected counts so that the
  corpus holds ``--cases`` (default 160,000) volumes; the NIfTI files themselves are not created (a dry run must not
  look at them: the DAG reads cards at parse time, never case files).

Then it times ``snakemake -n`` for the preprocessing targets (``preprocess_all``) and, where the rule files define it,
pseudo-labelling (any rule named ``pseudolabel*_all`` / ``pseudolabel``), for several shard counts and two corpus
sizes, and prints seconds and job counts: jobs must grow with shards, not with cases, and the 160K run must finish in
under 30 s (DESIGN "Scale").

    .venv/bin/python benchmarks/bench_dryrun.py [--cases 160000] [--shards 64 256] [--target preprocess_all ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "experiments" / "paper.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def write_corpus(work: Path, cases: int) -> dict[str, int]:
    """dataset.json + SOURCE.json per dataset of the paper config; returns cases per dataset."""
    cfg = yaml.safe_load(PAPER.read_text())
    pre, down = cfg["datasets"]["pretrain"], cfg["datasets"]["downstream"]
    cards = {d: yaml.safe_load((REPO / "config" / "datasets" / f"{d}.yaml").read_text()) for d in pre + down}
    weights = {d: max(1, cards[d].get("expected_count", 1)) for d in pre}
    total_w = sum(weights.values())
    counts = {d: max(1, round(cases * w / total_w)) for d, w in weights.items()}
    counts[max(counts, key=counts.get)] += cases - sum(counts.values())  # exactly `cases` pre-training volumes
    for d in down:
        counts[d] = max(1, cards[d].get("expected_count", 50))
    old = time.time() - 3600
    for d, n in counts.items():
        raw = work / "data" / "raw" / d
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "SOURCE.json").write_text(json.dumps({"dataset": d, "kind": "benchmark"}))
        os.utime(raw / "SOURCE.json", (old, old))
        nifti = work / "data" / "nifti" / d
        nifti.mkdir(parents=True, exist_ok=True)
        labelled = d in down
        training = [
            {"image": f"imagesTr/{d}_{i:06d}.nii.gz", **({"label": f"labelsTr/{d}_{i:06d}.nii.gz"} if labelled else {})}
            for i in range(n)
        ]
        doc = {
            "name": d,
            "voco_dataset": d,
            "region": cards[d]["region"],
            "labels": cards[d].get("labels", {}),
            "modality": cards[d].get("modality", {"0": "CT"}),
            "training": training,
            "test": [],
        }
        (nifti / "dataset.json").write_text(json.dumps(doc))
    return counts


def rule_names(work: Path, configfiles: list[str]) -> list[str]:
    out = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(work), "--configfile", *configfiles, "-l"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [ln.split()[0] for ln in out.stdout.splitlines() if ln.strip() and not ln.startswith(" ")]


def dry_run(work: Path, configfiles: list[str], targets: list[str]) -> tuple[float, int, dict[str, int]]:
    cmd = [
        SNAKEMAKE,
        "-n",
        "-q",
        "rules",
        "-s",
        str(REPO / "workflow" / "Snakefile"),
        "-d",
        str(work),
        "--configfile",
        *configfiles,
        "--",
        *targets,
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"snakemake -n failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    per_rule = {}
    for ln in (res.stdout + res.stderr).splitlines():
        m = re.match(r"^([A-Za-z_][\w]*)\s+(\d+)\s*$", ln.strip())
        if m:
            per_rule[m.group(1)] = int(m.group(2))
    total = per_rule.pop("total", sum(per_rule.values()))
    return dt, total, per_rule


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=160_000, help="pre-training volumes in the generated corpus")
    ap.add_argument(
        "--shards", type=int, nargs="+", help="shard counts to compare (default: 16, the paper's, 4x the paper's)"
    )
    ap.add_argument("--target", nargs="+", help="targets (default: preprocess_all + pseudo-labelling if defined)")
    ap.add_argument("--budget-s", type=float, default=30.0, help="target wall time of the largest dry run")
    args = ap.parse_args()
    paper_shards = int(yaml.safe_load(PAPER.read_text())["preprocess"]["shards"])
    args.shards = sorted(set(args.shards or [16, paper_shards, 4 * paper_shards]))

    tmp = Path(tempfile.mkdtemp(prefix="voco-dryrun-"))
    try:
        rows = []
        for cases in sorted({max(1, args.cases // 10), args.cases}):
            work = tmp / f"c{cases}"
            counts = write_corpus(work, cases)
            for shards in args.shards:
                ov = work / f"shards{shards}.yaml"
                ov.write_text(yaml.safe_dump({"preprocess": {"shards": shards}}))
                configfiles = [str(REPO / "config" / "config.yaml"), str(PAPER), str(ov)]
                targets = args.target
                if not targets:
                    names = rule_names(work, configfiles)
                    targets = ["preprocess_all"] + [n for n in names if re.fullmatch(r"pseudolabel\w*_all", n)]
                dt, jobs, per_rule = dry_run(work, configfiles, targets)
                rows.append((cases, len(counts), shards, jobs, dt, targets, per_rule))
                print(
                    f"cases={cases:>7} datasets={len(counts)} shards={shards:>4} jobs={jobs:>6} "
                    f"dry-run={dt:6.2f} s targets={' '.join(targets)}",
                    flush=True,
                )
                print("    " + ", ".join(f"{k}={v}" for k, v in sorted(per_rule.items())), flush=True)
        big = [r for r in rows if r[0] == args.cases]
        at_paper = [r[4] for r in big if r[2] == paper_shards]
        worst = max(at_paper) if at_paper else max(r[4] for r in big)
        jobs_by_shards = {r[2]: r[3] for r in big}
        same_jobs = all(r[3] == next(b[3] for b in big if b[2] == r[2]) for r in rows if r[0] != args.cases)
        counts_by_shards = [jobs_by_shards[k] for k in sorted(jobs_by_shards)]
        # More shards never means fewer jobs, and the step from the smallest shard count grows the DAG; beyond the
        # point where every dataset has ~cases_per_shard cases per shard (preprocess.cases_per_shard), it saturates.
        grows = all(a <= b for a, b in zip(counts_by_shards, counts_by_shards[1:], strict=False)) and (
            len(counts_by_shards) < 2 or counts_by_shards[0] < counts_by_shards[-1]
        )
        print(
            f"\n{args.cases} cases at the paper's {paper_shards} shards: dry run {worst:.2f} s "
            f"(target < {args.budget_s:.0f} s); "
            f"jobs grow with shards: {grows}; jobs independent of case count: {same_jobs}"
        )
        return 0 if (worst < args.budget_s and grows and same_jobs) else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
