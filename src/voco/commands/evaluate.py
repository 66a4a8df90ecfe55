"""``voco evaluate``: sliding-window inference of a fine-tuning run on its held-out cases, with metrics (SPEC 6).

Example::

    voco evaluate --dataset phantom_organs --run runs/finetune/phantom_organs/stage2/plain/nall-s0 \\
        --prep data/prep/phantom_organs --out results/phantom_organs/stage2/plain/nall-s0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from voco.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset card id (checked against the run)")
    parser.add_argument("--run", required=True, type=Path, help="fine-tuning run folder (run.json + model.pt)")
    parser.add_argument("--prep", required=True, type=Path, help="pre-processed store (data/prep/<dataset>)")
    parser.add_argument("--out", required=True, type=Path, help="results folder (summary.json, cases.csv)")
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default evaluate.overlap)")
    parser.add_argument("--split", choices=["auto", "test", "val"], default=None, help="default evaluate.split")
    parser.add_argument("--dataset-json", type=Path, default=None,
                        help="dataset.json with the original label files (default: found from each case's source)")
    parser.add_argument("--save-predictions", action="store_true",
                        help="also write predictions (original geometry) to OUT/predictions/<case>.nii.gz")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): the GPU with AMP when one is visible, else CPU")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from voco.data.store import Store
    from voco.errors import ConfigError
    from voco.eval.evaluate import evaluate_run
    from voco.io import read_json

    cfg = config_from_args(args)
    run_json = args.run / "run.json"
    if run_json.is_file() and read_json(run_json).get("dataset") != args.dataset:
        raise ConfigError(f"{run_json}: run of dataset {read_json(run_json).get('dataset')!r}, not {args.dataset!r}")
    evaluate_run(args.run, Store(args.prep), args.out, cfg["evaluate"], args.overlap, args.split, args.dataset_json,
                 args.save_predictions, device=args.device)
    return 0
