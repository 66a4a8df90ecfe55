"""``voco convert``: raw dataset (MSD / nnU-Net / DICOM / AbdomenAtlas) -> NIfTI + MSD-style ``dataset.json``.

Writes ``--out DIR``/``convert_report.json`` (cases that failed, with the reason, and warnings) and then
``DIR/dataset.json`` (last, atomically). A case that fails is left out and recorded; the others go on. Exit status:
0 when at least one case converted (``--strict``: only when none failed), 2 when nothing could be converted.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from voco.config import add_config_arguments, config_from_args, load_card
from voco.data.layouts import CONVERTERS, FORMATS, dataset_document
from voco.errors import DataError
from voco.io import write_json

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path, help="raw dataset folder (data/raw/<id>)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="input layout (default: the card's format)")
    parser.add_argument("--dataset", required=True, help="dataset card id (region, labels, name)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/nifti/<id>)")
    add_config_arguments(parser)
    parser.add_argument("--strict", action="store_true", help="exit 1 when any case failed")


def convert(inp: Path, out: Path, card: dict, fmt: str | None = None) -> dict:
    """Convert one dataset; returns the report (also written to ``out/convert_report.json``)."""
    fmt = fmt or card.get("format", "msd")
    inp, out = Path(inp), Path(out)
    if not inp.is_dir():
        raise DataError(f"{inp}: input folder not found")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)  # never leave a stale dataset.json beside a new report
    conv = CONVERTERS[fmt](inp, out, card)
    doc = dataset_document(conv, card, fmt)
    n_ok = len(conv.training) + len(conv.test)
    report = {
        "dataset": card["id"],
        "format": fmt,
        "input": str(inp),
        "n_ok": n_ok,
        "n_failed": len(conv.failed),
        "failed": conv.failed,
        "warnings": conv.warnings,
    }
    write_json(out / "convert_report.json", report)
    if n_ok == 0:
        reasons = "; ".join(f"{f['case']}: {f['reason']}" for f in conv.failed[:5])
        raise DataError(f"{inp}: no case could be converted ({reasons or 'no cases found'})")
    write_json(out / "dataset.json", doc)
    return report


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    card = load_card(args.dataset, cfg["cards_dir"])
    report = convert(args.input, args.out, card, args.format)
    log.info("%s: %d case(s) converted, %d failed -> %s", card["id"], report["n_ok"], report["n_failed"], args.out)
    for f in report["failed"]:
        log.warning("failed: %s: %s", f["case"], f["reason"])
    return 1 if (args.strict and report["n_failed"]) else 0
