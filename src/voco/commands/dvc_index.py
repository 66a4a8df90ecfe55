"""``voco dvc-index``: (re)generate ``dvc.yaml`` from the config, or ``--check`` that the committed one is current.

DVC stages cannot take a dependency list from the config, so the index is generated (voco.dvc_index) from the same
dataset lists, run name and paths the Snakemake rules use, and committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from voco.config import add_config_arguments, config_from_args, load_card, repo_root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="file to write (default: dvc.yaml at the repository root)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be generated")


def run(args: argparse.Namespace) -> int:
    from voco import dag
    from voco.dvc_index import build_index, render

    cfg = config_from_args(args)
    _, _, everything = dag.datasets(cfg)
    cards = {d: load_card(d, cfg["cards_dir"]) for d in everything}
    root = repo_root()
    config_file = Path(args.config) if args.config else root / "config" / "config.yaml"
    try:
        rel = str(config_file.resolve().relative_to(root))
    except ValueError:
        rel = str(config_file)
    text = render(build_index(cfg, cards, rel))
    out = args.out or root / "dvc.yaml"
    if args.check:
        current = out.read_text() if out.is_file() else ""
        if current != text:
            print(f"voco dvc-index: {out} is out of date with the config; run `voco dvc-index` to regenerate it",
                  file=sys.stderr)
            return 1
        print(f"{out} is current")
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0
