"""``voco audit-leakage``: compare the pre-training corpus with what downstream evaluation scores, by content hash.

Three forms (the DAG uses the last two plus the merge, so that the corpus is hashed once and each downstream dataset's
fine-tuning waits only for its own verdict)::

    voco audit-leakage --pretrain P.parquet... --downstream D.parquet... --out report.json     # all in one
    voco audit-leakage --pretrain P.parquet... --index-out pretrain_index.parquet              # corpus fingerprints
    voco audit-leakage --index pretrain_index.parquet --downstream D.parquet --out D.json       # one dataset
    voco audit-leakage --merge D1.json D2.json ... --out report.json                           # the summary

The downstream cases audited are, by default (``--splits eval``), exactly what evaluation scores: the test split, or
the validation part carved out of training where the test split has no labels (``voco.train.finetune.split_cases``
with the dataset's card, found through ``--config``). Writes the JSON report to ``--out`` and a Markdown table next to
it. ``--fail-on-overlap`` (what the DAG passes when ``audit.enforce`` is true) exits 1 when any evaluation case is
also a pre-training case, after logging them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from voco.config import add_config_arguments, config_from_args
from voco.data.leakage import EVAL, audit, build_index, merge_reports, to_markdown, write_index
from voco.errors import ConfigError
from voco.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrain", nargs="*", default=[], help="pre-training manifest.parquet file(s); none = nothing can leak"
    )
    parser.add_argument("--downstream", nargs="*", default=[], help="downstream manifest.parquet file(s)")
    parser.add_argument("--out", default=None, help="JSON report (a .md table is written next to it)")
    parser.add_argument(
        "--splits", nargs="+", default=[EVAL],
        help="what to audit: 'eval' (default: what evaluation scores, validation carve-out included) and / or "
        "manifest splits (test, train)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes for hashing (default 1)")
    parser.add_argument("--fail-on-overlap", action="store_true", help="exit 1 when any overlap is found")
    parser.add_argument("--index-out", default=None, help="write the pre-training fingerprint index here and stop")
    parser.add_argument("--index", default=None, help="pre-training fingerprint index (instead of --pretrain)")
    parser.add_argument("--merge", nargs="*", default=None, help="per-dataset JSON reports to merge into --out")
    add_config_arguments(parser)  # the dataset cards (cards_dir) for the eval splits


def _cards(args: argparse.Namespace, manifests: list[str]) -> dict[str, dict]:
    """The cards of the downstream datasets (by the manifests' dataset column) that exist in the config's cards_dir."""
    import pandas as pd

    from voco.config import load_card

    if EVAL not in args.splits or not manifests:
        return {}
    cfg = config_from_args(args)
    cards = {}
    for m in manifests:
        try:
            ids = pd.read_parquet(m, columns=["dataset"])["dataset"].dropna().unique()
        except Exception:  # noqa: BLE001 - an unreadable manifest is reported by the audit itself
            continue
        for d in ids:
            try:
                cards[str(d)] = load_card(str(d), cfg["cards_dir"])
            except ConfigError as e:
                log.warning("%s: %s", m, e)
    return cards


def run(args: argparse.Namespace) -> int:
    if args.index_out:
        df = build_index(args.pretrain, workers=args.workers)
        write_index(df, args.index_out)
        log.info("leakage index: %d pre-training case(s) from %d manifest(s) -> %s (%d unreadable)", len(df),
                 len(args.pretrain), args.index_out, int(df["error"].notna().sum()) if len(df) else 0)
        return 0
    if not args.out:
        raise ConfigError("voco audit-leakage: --out is required (or --index-out to build the corpus index)")
    if args.merge is not None:
        report = merge_reports([read_json(p) for p in args.merge])
    else:
        report = audit(args.pretrain, args.downstream, splits=args.splits, workers=args.workers,
                       cards=_cards(args, args.downstream), index=args.index)
    out = Path(args.out)
    md = out.with_suffix(".md")
    text = to_markdown(report)
    with atomic_path(md) as tmp:
        tmp.write_text(text)
    write_json(out, report)
    n = report["n_overlapping_cases"]
    if n:
        log.warning(
            "leakage: %d of %d downstream evaluation case(s) also occur in the pre-training corpus (see %s)",
            n,
            report["n_downstream"],
            md,
        )
        for o in report["overlaps"][:50]:
            log.warning("leakage: %s/%s (%s) = %s/%s by %s", o["downstream_dataset"], o["downstream_case"],
                        o["split"], o["pretrain_dataset"], o["pretrain_case"], " + ".join(o["match"]))
    else:
        log.info("leakage: no overlap among %d downstream evaluation cases (%s)", report["n_downstream"], md)
    for note in report.get("notes", []):
        log.warning("leakage: %s", note)
    if report["unreadable"]:
        log.warning("leakage: %d source file(s) could not be read; see %s", len(report["unreadable"]), md)
    if n and args.fail_on_overlap:
        log.error("leakage: audit.enforce is on: %d evaluation case(s) overlap the pre-training corpus; remove them "
                  "from one side (or set audit.enforce: false to report only)\n%s", n, text)
        return 1
    return 0
