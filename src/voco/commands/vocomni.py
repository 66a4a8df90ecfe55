"""``voco vocomni``: VoComni curation (SPEC 3).

An ensemble of supervised models (``vocomni.members``), trained briefly with the shared loop on the labelled sources'
partial labels mapped into the VoComni classes (marginal DiceCE), completes every source volume: the source's own
classes are kept exactly, the others are filled from the averaged softmax maps; volumes under the confidence /
agreement thresholds are dropped. Output: a store (``OUT/manifest.parquet``) that stage 1 reads, a per-volume table
``OUT/curation.parquet``, a plot ``OUT/curation.png`` and the Dice against the phantoms' full truth in ``--report``.
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
    parser.add_argument("--prep", required=True, type=Path, nargs="+", action="extend",
                        help="pre-processed labelled source store(s) (data/prep/<dataset>); repeatable")
    parser.add_argument("--out", required=True, type=Path, help="output store folder (data/vocomni)")
    parser.add_argument("--work", type=Path, default=None,
                        help="ensemble member run folders (default <runs>/vocomni); members resume from here")
    parser.add_argument("--report", type=Path, default=None,
                        help="summary JSON with the Dice of completed labels (default <results>/omni/curation.json)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from voco.omni.curation import run_curation

    cfg = config_from_args(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = args.work or Path(cfg["paths"]["runs"]) / "vocomni"
    report = args.report or Path(cfg["paths"]["results"]) / "omni" / "curation.json"
    log.info("vocomni config: %s", json.dumps(cfg["vocomni"]))
    summary = run_curation(args.prep, args.out, cfg, work, report)
    d = summary["dice"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    log.info(
        "VoComni: %d volumes, %d kept, %d dropped; Dice vs full truth on filled classes: completed %s "
        "(source labels alone %s), given classes %s -> %s",
        summary["volumes"], summary["kept"], summary["dropped"], fmt(d["completed_filled_mean"]),
        fmt(d["partial_filled_mean"]), fmt(d["completed_given_mean"]), report,
    )
    return 0
