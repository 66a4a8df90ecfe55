"""`voco config`: validate the config (plus override files) and print the resolved result with defaults filled."""

from __future__ import annotations

import argparse
import sys

import yaml

from voco.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config file (default: config/config.yaml)")
    parser.add_argument("--override", action="append", default=[], help="override file merged on top (repeatable)")
    parser.add_argument("--key", default=None, help="print only this dotted key, e.g. preprocess.regions")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.override)
    out = cfg
    if args.key:
        for part in args.key.split("."):
            if not isinstance(out, dict) or part not in out:
                print(f"voco config: no key {args.key!r}", file=sys.stderr)
                return 2
            out = out[part]
    sys.stdout.write(yaml.safe_dump(out, sort_keys=False))
    return 0
