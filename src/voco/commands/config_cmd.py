"""`voco config`: validate a config (+ experiment / override files, --set flags) and print the resolved result.

The header says which layers made it (lowest first). ``--dataset ID`` resolves it for one dataset (its card's
``finetune`` / ``preprocess`` values between the experiment layers and your overrides); ``--key`` prints one key.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from voco.config import add_config_arguments, config_from_args, load_card, region_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--key", default=None, help="print only this dotted key, e.g. preprocess.regions")
    parser.add_argument("--dataset", default=None, metavar="ID",
                        help="resolve for this dataset card (card values above the experiment, below your overrides)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = cfg.to_dict()
    header = [f"# voco config: experiment {cfg.get('experiment', '?')}; layers, lowest first:"]
    header += [f"#   {layer.kind:<10} {layer.source}" for layer in cfg.layers]
    if args.dataset:
        card = load_card(args.dataset, cfg["cards_dir"])
        ds = cfg.for_dataset(card)
        out = ds.to_dict()
        out["dataset_preprocess"] = region_params(ds, card)
        header.append(f"#   card       {card['_path']} (dataset {args.dataset}; dataset_preprocess = its effective "
                      "preprocessing)")
    if args.key:
        for part in args.key.split("."):
            if not isinstance(out, dict) or part not in out:
                print(f"voco config: no key {args.key!r}", file=sys.stderr)
                return 2
            out = out[part]
    sys.stdout.write("\n".join(header) + "\n")
    sys.stdout.write(yaml.safe_dump(out, sort_keys=False, default_flow_style=None))
    return 0
