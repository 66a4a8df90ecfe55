"""``voco pretrain``: pre-train a backbone.

Dispatch by method / stage to the stage modules (each runs on the shared loop in ``voco.train.loop``):

* ``--method voco|voco-v1`` (``--stage ssl``, the default): ``voco.train.pretrain_ssl.run_ssl``;
* ``--stage 1|2`` (omni-supervised VoCo, SPEC 3): ``voco.omni.stages.run_stage``;
* ``--method suprem`` (SPEC 5): ``voco.omni.suprem.run_suprem``.

``--nproc N|auto`` re-runs the same command under ``torchrun --standalone --nproc_per_node=N`` (DDP) when N > 1.
``--nodes M`` (M >= 1, inside a SLURM job with M nodes: the rule's ``nodes`` resource) re-runs it through ``srun`` on
the allocation's nodes, ``torchrun --nnodes=M --nproc_per_node=N`` on each with a c10d rendezvous on the first node.

SIGTERM / SIGUSR1: the run finishes its step, writes ``last.pt`` and exits 75 ("interrupted, resumable"); the same
command resumes it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from voco.config import add_config_arguments, config_from_args
from voco.errors import ConfigError

log = logging.getLogger(__name__)

#: SIGTERM / SIGUSR1 checkpoint and exit 75 (voco.cli, voco.train.preempt)
STOPS_ON_SIGNALS = True

METHODS = ("voco", "voco-v1", "suprem")
STAGES = ("ssl", "1", "2")

# (method family, stage) -> (module, function)
DISPATCH = {
    ("ssl", "ssl"): ("voco.train.pretrain_ssl", "run_ssl"),
    ("ssl", "1"): ("voco.omni.stages", "run_stage"),
    ("ssl", "2"): ("voco.omni.stages", "run_stage"),
    ("suprem", "ssl"): ("voco.omni.suprem", "run_suprem"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="voco (TPAMI, default: pretrain.method), voco-v1 (CVPR 2024) or suprem (supervised)",
    )
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default="ssl",
        help="ssl = self-supervised only (default); 1 / 2 = omni-supervised stages (SPEC 3)",
    )
    parser.add_argument(
        "--prep",
        nargs="+",
        required=True,
        metavar="DIR",
        help="pre-processed stores (folders holding manifest.parquet) of the pre-training corpus",
    )
    parser.add_argument("--out", required=True, help="run folder, e.g. runs/pretrain/default/ssl")
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="volumes per step per process")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: pretrain.seed)")
    parser.add_argument(
        "--num-workers", default=None, metavar="N|auto",
        help="DataLoader workers per process (default: pretrain.num_workers; auto = the job's CPUs / processes - 1)",
    )
    parser.add_argument(
        "--nproc",
        default="1",
        metavar="N|auto",
        help="DDP processes on this node (auto = visible GPUs); > 1 re-runs under torchrun",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=0,
        metavar="M",
        help="0 (default): this node only. M >= 1: srun + torchrun over M nodes of the current SLURM allocation "
        "(c10d rendezvous on the first node); the rule passes its `nodes` resource",
    )
    # stage-specific inputs (omni stages); ignored by the SSL stage
    parser.add_argument(
        "--labelled", nargs="*", default=[], metavar="DIR", help="omni stages: stores with (curated) labels"
    )
    parser.add_argument("--pseudo", default=None, metavar="DIR", help="stage 2: pseudo-label folder")
    parser.add_argument(
        "--init", default=None, metavar="CKPT", help="start from this checkpoint (e.g. stage 1 final.pt)"
    )


def resolve(args: argparse.Namespace, cfg: dict) -> tuple[str, str]:
    """(module, function) that runs this call."""
    method = args.method or cfg.get("pretrain", {}).get("method", "voco")
    args.method = method
    family = "suprem" if method == "suprem" else "ssl"
    key = (family, str(args.stage))
    if key not in DISPATCH:
        raise ConfigError(f"voco pretrain: --method {method} has no --stage {args.stage}")
    return DISPATCH[key]


def strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (torchrun would take ``--nproc`` as its own option)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def run(args: argparse.Namespace) -> int:
    from voco.train import distributed as dist

    cfg = config_from_args(args)
    module_name, func_name = resolve(args, cfg)
    nproc = dist.resolve_nproc(args.nproc)
    nodes = int(args.nodes or 0)
    if nodes < 0:
        raise ConfigError(f"--nodes must be >= 0, got {nodes}")
    if (nproc > 1 or nodes >= 1) and not dist.under_torchrun():
        argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("voco", "cli.py")) else None
        if argv is None:
            raise ConfigError("--nproc > 1 / --nodes need the `voco` command line (run `voco pretrain ... --nproc N`)")
        argv = strip_option(strip_option(argv, "--nproc"), "--nodes")
        if nodes >= 1:
            return dist.relaunch_under_srun(nodes, nproc, argv)
        return dist.relaunch_under_torchrun(nproc, argv)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(
                f"voco pretrain --method {args.method} --stage {args.stage}: {module_name} is not "
                "available in this version"
            ) from e
        raise
    dist.init_distributed()
    try:
        if dist.is_main():
            log.info(
                "voco pretrain %s stage %s -> %s (%s.%s)", args.method, args.stage, args.out, module_name, func_name
            )
        return int(getattr(module, func_name)(cfg, args) or 0)
    finally:
        dist.cleanup()
