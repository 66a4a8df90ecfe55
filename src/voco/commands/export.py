"""``voco export``: a fine-tuned run as a MONAI bundle or a Hugging Face-style model folder (safetensors).

Example::

    voco export --run runs/finetune/btcv/stage2/plain/nall-s0 --format monai-bundle --out export/btcv_bundle
    voco export --run runs/finetune/btcv/stage2/plain/nall-s0 --format hf --out export/btcv_hf
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="fine-tuning run folder (run.json + model.pt)")
    parser.add_argument("--format", required=True, choices=["monai-bundle", "hf"], help="export format")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--results", type=Path, default=None,
                        help="results root with the run's evaluation (default: paths.results of the config)")
    parser.add_argument("--config", type=Path, default=None, help="config file (default config/config.yaml)")
    parser.add_argument("--override", type=Path, action="append", default=[], help="override file (repeatable)")


def run(args: argparse.Namespace) -> int:
    from voco.config import load_config
    from voco.export import export

    cfg = load_config(args.config, args.override)
    export(args.run, args.format, args.out, args.results or cfg["paths"]["results"])
    return 0
