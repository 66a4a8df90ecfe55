"""``voco preprocess``: dataset.json -> pre-processed fast-load store + manifest.parquet (SPEC 1).

Every listed case ends ``ok`` or ``rejected`` with a reason; exit status 0 unless ``--strict`` and a case was rejected.
Results are keyed on input content + parameters: a re-run with the same inputs reuses stored cases.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from voco.config import add_config_arguments, config_from_args
from voco.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-json", required=True, type=Path, help="MSD-style dataset.json (voco convert)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/prep/<dataset>)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any case is rejected")
    parser.add_argument("--shard", type=int, default=None, help="process shard K only (writes OUT/shard-K/)")
    parser.add_argument("--num-shards", type=int, default=None, help="number of shards (default preprocess.shards)")
    parser.add_argument("--dataset", default=None, help="dataset card id (default: dataset.json voco_dataset)")
    parser.add_argument("--region", default=None, help="region tag when no card exists and dataset.json has none")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    add_config_arguments(parser)


def resolve(args: argparse.Namespace, info: Any, cfg: dict) -> tuple[str, str, Any, dict[int, str], dict[int, str]]:
    """Dataset id, region, Params, label map and full label map for this dataset.json + config (+ card)."""
    from voco.config import load_card, region_params
    from voco.data.preprocess import Params
    from voco.ids import check_id

    dataset = args.dataset or info.voco_dataset or re.sub(r"[^a-z0-9_]+", "_", info.name.lower()).strip("_")
    try:
        check_id(dataset, f"{info.path}: dataset id" if not args.dataset else "--dataset")
    except DataError as e:
        raise ConfigError(str(e)) from None
    card: dict[str, Any] | None = None
    try:
        card = load_card(dataset, cfg["cards_dir"])
    except ConfigError as e:
        if "not found" not in str(e):
            raise
        log.info("no dataset card for %r: using the dataset.json's region and the region defaults", dataset)
    if card is None:
        region = info.region or args.region
        if not region:
            raise ConfigError(
                f"{info.path}: no dataset card {dataset!r} and no 'region' in the dataset.json; pass --region"
            )
        card = {"id": dataset, "region": region, "preprocess": {}}
    params = region_params(cfg, card)
    modality = info.modality or {int(k): v for k, v in (card.get("modality") or {"0": "CT"}).items()}
    labels = info.labels or {int(k): v for k, v in (card.get("labels") or {}).items()}
    return dataset, card["region"], Params.from_region_params(params, modality), labels, info.labels_full


def _work(job: tuple) -> dict[str, Any]:
    from voco.data.preprocess import process_entry

    t0 = time.perf_counter()
    row = process_entry(*job)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from voco.data.catalog import read_dataset_json
    from voco.data.store import MANIFEST, write_manifest

    cfg = config_from_args(args)
    info = read_dataset_json(args.dataset_json)
    dataset, region, params, labels, labels_full = resolve(args, info, cfg)
    out = Path(args.out)
    entries = info.entries
    if args.shard is not None or args.num_shards is not None:
        n = args.num_shards or int(cfg["preprocess"]["shards"])
        k = 0 if args.shard is None else args.shard
        entries = info.shard(k, n)
        out = out / f"shard-{k}"
    out.mkdir(parents=True, exist_ok=True)
    log.info(
        "preprocess %s (%s): %d case(s) -> %s; spacing %s mm, window %s, roi %s, modality %s",
        dataset,
        region,
        len(entries),
        out,
        list(params.spacing),
        list(params.window),
        list(params.roi),
        list(params.modality),
    )
    jobs = [(e, out, params, dataset, region, labels, labels_full) for e in entries]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=f"preprocess {dataset}", unit="case", mininterval=1.0)
    try:
        if args.jobs > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=args.jobs) as ex:
                results = ex.map(_work, jobs, chunksize=1)
                for row in results:
                    rows.append(_report(row, bar))
        else:
            for job in jobs:
                rows.append(_report(_work(job), bar))
    finally:
        bar.close()
    if args.shard in (None, 0):  # cases the conversion could not produce: rejected rows (once, in shard 0)
        from voco.data.preprocess import rejected_row

        for j, r in enumerate(info.rejected):
            rows.append(_report(rejected_row(r["case"], r["reason"], dataset, region, params,
                                             len(info.entries) + j), None))
    # timing and reuse go to the log only: the manifest stays a deterministic function of inputs and parameters
    write_manifest([{k: v for k, v in r.items() if k not in ("cached", "seconds")} for r in rows], out / MANIFEST)
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_cached = sum(bool(r.get("cached")) for r in rows)
    n_rej = len(rows) - n_ok
    log.info(
        "%s: %d ok (%d reused), %d rejected, %.1f s -> %s",
        dataset,
        n_ok,
        n_cached,
        n_rej,
        time.perf_counter() - t0,
        out / MANIFEST,
    )
    if n_rej and args.strict:
        log.error("--strict: %d case(s) rejected", n_rej)
        return 1
    return 0


def _report(row: dict[str, Any], bar: Any) -> dict[str, Any]:
    if bar is not None:
        bar.update(1)
    if row["status"] == "ok":
        log.info(
            "case %s: ok%s shape %s (from %s) %.2fs",
            row["case_id"],
            " (reused)" if row.get("cached") else "",
            list(row["shape"]),
            list(row["original_shape"]),
            row.get("seconds", 0.0),
        )
    else:
        log.warning("case %s: rejected: %s", row["case_id"], row["reason"])
    return row
