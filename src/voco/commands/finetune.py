"""``voco finetune``: fine-tune a segmentation / classification model on one downstream dataset from one init (SPEC 6).

Example::

    voco finetune --dataset phantom_organs --init stage2 --method plain --n-train all --seed 0 \\
        --prep data/prep/phantom_organs --out runs/finetune/phantom_organs/stage2/plain/nall-s0
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from voco.config import add_config_arguments, config_from_args

log = logging.getLogger(__name__)

#: SIGTERM / SIGUSR1 checkpoint and exit 75 (voco.cli, voco.train.preempt)
STOPS_ON_SIGNALS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset card id")
    parser.add_argument("--init", required=True,
                        help="scratch | ssl | stage1 | stage2 | suprem (runs/pretrain/<run>/<init>/) | file (--init-path)")
    parser.add_argument("--init-path", default=None, help="checkpoint file (released VoCo / VoComni / SuPreM or ours)")
    parser.add_argument("--method", default="plain", choices=["plain", "medcontext"], help="fine-tuning method")
    parser.add_argument("--n-train", default="all", help="labelled training cases: an integer or 'all' (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed (weights, crops, the N-case subset)")
    parser.add_argument("--prep", required=True, type=Path, help="pre-processed store (data/prep/<dataset>)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (runs/finetune/<dataset>/<init>/<method>/nN-sS)")
    parser.add_argument("--steps", type=int, default=None, help="override finetune.steps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): the GPU with AMP when one is visible, else CPU")
    parser.add_argument("--num-workers", default=None, metavar="N|auto",
                        help="crop loader workers (default finetune.num_workers; auto = the job's CPUs - 1)")
    add_config_arguments(parser)


def dataset_card(dataset: str, cfg: dict, store) -> dict:
    """The dataset's card, or (no card: e.g. an ad-hoc real-data task) one built from the store's label map."""
    from voco.config import load_card
    from voco.errors import ConfigError

    try:
        return load_card(dataset, cfg["cards_dir"])
    except ConfigError as e:
        if "not found" not in str(e):
            raise
    ids = store.ids()
    if not ids:
        raise ConfigError(f"no dataset card {dataset!r} and no ok case in {store.root}")
    labels = store.load(ids[0]).meta.get("labels") or {}
    log.warning("no dataset card %r: segmentation with the stored label map %s", dataset, labels)
    return {"id": dataset, "task": "segmentation", "labels": labels, "split": {}, "finetune": {}}


def run(args: argparse.Namespace) -> int:
    from voco.data.store import Store
    from voco.train.finetune import finetune, parse_n

    cfg = config_from_args(args)
    store = Store(args.prep)
    card = dataset_card(args.dataset, cfg, store)
    log.info("finetune %s init=%s method=%s n=%s seed=%d -> %s", args.dataset, args.init, args.method,
             args.n_train, args.seed, args.out)
    finetune(cfg, card, store, args.out, args.init, args.method, parse_n(args.n_train), args.seed,
             args.init_path, args.steps, device=args.device, num_workers=args.num_workers)
    return 0
