"""``voco export``: a fine-tuned run as a MONAI bundle or a Hugging Face-style model folder (safetensors).

Example::

    voco export --run runs/finetune/btcv/stage2/plain/nall-s0 --format monai-bundle --out export/btcv_bundle
    voco export --run runs/finetune/btcv/stage2/plain/nall-s0 --format hf --out export/btcv_hf
"""

from __future__ import annotations

import argparse
from pathlib import Path

from voco.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="fine-tuning run folder (run.json + model.pt)")
    parser.add_argument("--format", required=True, choices=["monai-bundle", "hf"], help="export format")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--results", type=Path, default=None,
                        help="results root with the run's evaluation (default: paths.results of the config)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from voco.export import export

    cfg = config_from_args(args)
    export(args.run, args.format, args.out, args.results or cfg["paths"]["results"], dict(cfg["evaluate"]))
    return 0
