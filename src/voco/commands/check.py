"""``voco check``: validate the whole plan of a config in seconds, without data and without a GPU.

Examples::

    voco check                                              # the laptop default
    voco check --override config/experiments/paper.yaml     # the paper plan (what `snakemake --profile slurm all` runs)
    voco check --override my.yaml --set finetune.roi=[64,64,64]

Exit status 0 when the plan is sound, 1 when a check failed (each failure names the file, the key, the value and the
fix), 2 when the configuration itself does not resolve.
"""

from __future__ import annotations

import argparse
import sys

from voco.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-models", action="store_true", help="skip the model builds (no torch import)")
    parser.add_argument("--verbose", action="store_true", help="also print the informational findings")


def run(args: argparse.Namespace) -> int:
    from voco.check import format_report, run_check

    cfg = config_from_args(args)
    report = run_check(cfg, models=not args.no_models)
    print(format_report(cfg, report, verbose=args.verbose), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
