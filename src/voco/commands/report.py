"""``voco report``: paper-style tables and plots from every evaluation summary (Markdown, CSV, PNG).

Example::

    voco report --results results --runs runs --out results/report
"""

from __future__ import annotations

import argparse
from pathlib import Path

from voco.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results"), help="results root (results/<dataset>/...)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="runs root (training curves, transfer reports)")
    parser.add_argument("--out", type=Path, default=Path("results/report"), help="report folder")
    parser.add_argument("--dataset", action="append", default=None, help="only this dataset (repeatable)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from voco.eval.report import build_report

    cfg = config_from_args(args)["report"]
    summary = build_report(args.results, args.out, args.runs, (cfg["baseline_init"], cfg["baseline_method"]),
                           int(cfg["digits"]), args.dataset)
    print(f"report: {summary['runs']} runs -> {args.out / 'report.md'}")
    return 0
