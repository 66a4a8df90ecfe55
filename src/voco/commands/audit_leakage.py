"""``voco audit-leakage``: compare the pre-training corpus with downstream evaluation splits by content hash.

Writes the JSON report to ``--out`` and a Markdown table next to it (same name, ``.md``). Exit status 0 with the
overlaps reported; ``--fail-on-overlap`` exits 1 when any evaluation case is also a pre-training case.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from voco.data.leakage import audit, to_markdown
from voco.io import atomic_path, write_json

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrain", nargs="*", default=[], help="pre-training manifest.parquet file(s); none = nothing can leak"
    )
    parser.add_argument("--downstream", nargs="*", default=[], help="downstream manifest.parquet file(s)")
    parser.add_argument("--out", required=True, help="JSON report (a .md table is written next to it)")
    parser.add_argument(
        "--splits", nargs="+", default=["test"], help="downstream splits to check (default: test, the evaluation split)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes for hashing (default 1)")
    parser.add_argument("--fail-on-overlap", action="store_true", help="exit 1 when any overlap is found")


def run(args: argparse.Namespace) -> int:
    report = audit(args.pretrain, args.downstream, splits=args.splits, workers=args.workers)
    out = Path(args.out)
    md = out.with_suffix(".md")
    with atomic_path(md) as tmp:
        tmp.write_text(to_markdown(report))
    write_json(out, report)
    n = report["n_overlapping_cases"]
    if n:
        log.warning(
            "leakage: %d of %d downstream evaluation case(s) also occur in the pre-training corpus (see %s)",
            n,
            report["n_downstream"],
            md,
        )
    else:
        log.info("leakage: no overlap among %d downstream evaluation cases (%s)", report["n_downstream"], md)
    if report["unreadable"]:
        log.warning("leakage: %d source file(s) could not be read; see %s", len(report["unreadable"]), md)
    return 1 if (n and args.fail_on_overlap) else 0
