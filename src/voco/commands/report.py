"""``voco report``: paper-style tables and plots from every evaluation summary (Markdown, CSV, PNG).

Example::

    voco report --results results --runs runs --out results/report
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results"), help="results root (results/<dataset>/...)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="runs root (training curves, transfer reports)")
    parser.add_argument("--out", type=Path, default=Path("results/report"), help="report folder")
    parser.add_argument("--dataset", action="append", default=None, help="only this dataset (repeatable)")
    parser.add_argument("--config", type=Path, default=None, help="config file (default config/config.yaml)")
    parser.add_argument("--override", type=Path, action="append", default=[], help="override file (repeatable)")


def run(args: argparse.Namespace) -> int:
    from voco.config import load_config
    from voco.eval.report import build_report

    cfg = load_config(args.config, args.override)["report"]
    summary = build_report(args.results, args.out, args.runs, (cfg["baseline_init"], cfg["baseline_method"]),
                           int(cfg["digits"]), args.dataset)
    print(f"report: {summary['runs']} runs -> {args.out / 'report.md'}")
    return 0
