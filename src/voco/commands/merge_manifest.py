"""``voco merge-manifest``: per-shard manifests -> one manifest.parquet with paths relative to its folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inputs", nargs="+", required=True, type=Path, help="shard manifest.parquet files")
    parser.add_argument("--out", required=True, type=Path, help="merged manifest.parquet to write")


def run(args: argparse.Namespace) -> int:
    from voco.data.store import merge_manifests

    df = merge_manifests(args.inputs, args.out)
    n_ok = int((df["status"] == "ok").sum()) if len(df) else 0
    log.info(
        "merged %d manifest(s): %d case(s), %d ok, %d rejected -> %s",
        len(args.inputs),
        len(df),
        n_ok,
        len(df) - n_ok,
        args.out,
    )
    return 0
