"""The ``voco`` command: one subcommand per pipeline step (rule name = subcommand = DVC stage).

Each subcommand lives in ``voco.commands.<module>`` and defines::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

Modules are imported only when their subcommand runs, so ``voco --help`` stays fast (no torch import).

A module that sets ``STOPS_ON_SIGNALS = True`` (the training commands) gets SIGTERM / SIGUSR1 turned into a stop
request (:mod:`voco.train.preempt`) before it runs: it checkpoints and the command exits with status 75
(:data:`voco.errors.EXIT_INTERRUPTED`, "interrupted, resumable"). Exit statuses: 0 done, 2 a user error (one line on
stderr naming the problem), 75 interrupted and resumable, anything else a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import sys

from voco import __version__
from voco.errors import EXIT_INTERRUPTED, Interrupted, VocoError

# name -> (module under voco.commands, one-line help). Keep in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "write the embedded default data: synthetic CT phantoms in MSD layout (+ one DICOM dataset)"),
    "download": ("download", "download a dataset from its card's source (HF hub / HTTP+sha256), resumable and checked"),
    "convert": ("convert", "DICOM series / MSD / nnU-Net / AbdomenAtlas input -> NIfTI + MSD dataset.json"),
    "preprocess": ("preprocess", "RAS, spacing, HU window, foreground crop, pad; sharded fast-load store + manifest"),
    "merge-manifest": ("merge_manifest", "merge per-shard manifests into one manifest.parquet"),
    "audit-leakage": ("audit_leakage", "compare the pre-training corpus with downstream evaluation splits by content"),
    "vocomni": ("vocomni", "VoComni curation: ensemble completes partial labels, low-confidence volumes dropped"),
    "pretrain": ("pretrain", "pre-train a backbone (voco | voco-v1 SSL, omni stages 1/2, suprem)"),
    "pseudolabel": ("pseudolabel", "label unlabelled volumes with the stage-1 model (sliding window, per shard)"),
    "finetune": ("finetune", "fine-tune a segmentation / classification model from an init"),
    "evaluate": ("evaluate", "sliding-window inference and metrics (Dice, HD95, NSD / accuracy, AUC)"),
    "report": ("report", "paper-style tables and plots from the evaluation results"),
    "predict": ("predict", "segment new scans (NIfTI / DICOM) with a fine-tuned run; masks in their original geometry"),
    "export": ("export", "share a fine-tuned run: MONAI bundle or Hugging Face-style folder (safetensors + model card)"),
    "container": ("container", "check containers/voco.def with spython, build the Apptainer image where apptainer is"),
    "config": ("config_cmd", "validate a config (and overrides) and print the resolved result"),
    "dvc-index": ("dvc_index", "generate dvc.yaml (the DVC index over the workflow) from the config, or --check it"),
    "check": ("check", "validate the whole plan (rules, cards, model builds, inits, profiles) in seconds"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(f"voco.commands.{mod}") is not None:
            out[name] = (mod, help_)
    return out


def build_parser(commands: dict[str, tuple[str, str]] | None = None) -> argparse.ArgumentParser:
    commands = _available() if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="voco",
        description="Reproducible VoCo pre-training pipeline: every pipeline step is a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"voco {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_mod, help_) in commands.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    top = build_parser(commands)
    # Find the subcommand: first non-option argument.
    idx = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if idx is None or argv[idx] not in commands:
        if idx is not None:
            top.error(f"unknown command {argv[idx]!r}; choose from: {', '.join(commands)}")
        args = top.parse_args(argv)
        top.print_help()
        return 0 if args.command is None and ("-h" in argv or "--help" in argv) else 1
    name = argv[idx]
    top_args = top.parse_args(argv[:idx])
    module = importlib.import_module(f"voco.commands.{commands[name][0]}")
    parser = argparse.ArgumentParser(prog=f"voco {name}", description=commands[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[idx + 1 :])
    _setup_logging(top_args.verbose)
    stops = contextlib.nullcontext()
    if getattr(module, "STOPS_ON_SIGNALS", False):
        from voco.train import preempt

        stops = preempt.stop_on_signals()  # installed before the command builds anything; restored afterwards
    try:
        with stops:
            return int(module.run(args) or 0)
    except Interrupted as e:
        logging.getLogger("voco").warning("%s", e)
        print(f"voco {name}: {e} (exit status {EXIT_INTERRUPTED})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except VocoError as e:
        logging.getLogger("voco").error("%s", e)
        print(f"voco {name}: error: {e}", file=sys.stderr)
        return 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
