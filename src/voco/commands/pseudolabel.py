"""``voco pseudolabel``: the stage-1 model labels unlabelled volumes (SPEC 3), one shard per call.

    voco pseudolabel --ckpt runs/pretrain/default/stage1/final.pt --prep data/prep/phantom_pool \\
        --out runs/pretrain/default/pseudo/phantom_pool --shard 0 --num-shards 2
    voco pseudolabel --merge --out runs/pretrain/default/pseudo/phantom_pool --num-shards 2 \\
        --report results/omni/pseudo_phantom_pool.json

A shard call writes ``OUT/shard-K/`` (labels, per-volume confidence, Dice vs full truth where the store has it); the
merge writes ``OUT/manifest.parquet`` (volumes under ``pretrain.omni.pseudo_min_confidence`` rejected, so stage 2
leaves them out), ``OUT/low_confidence.csv`` and the summary JSON. Without ``--shard`` one call does everything.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from voco.config import add_config_arguments, config_from_args

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=None, help="stage-1 checkpoint (runs/pretrain/<run>/stage1/final.pt)")
    parser.add_argument("--prep", type=Path, default=None, help="pre-processed store of the unlabelled dataset")
    parser.add_argument("--out", required=True, type=Path, help="pseudo-label folder (runs/pretrain/<run>/pseudo/<X>)")
    parser.add_argument("--shard", type=int, default=None, help="label shard K only (writes OUT/shard-K/)")
    parser.add_argument("--num-shards", type=int, default=None, help="number of shards (default preprocess.shards)")
    parser.add_argument("--merge", action="store_true", help="merge OUT/shard-*/ into OUT/manifest.parquet + summary")
    parser.add_argument("--report", type=Path, default=None,
                        help="summary JSON (default <results>/omni/pseudo_<dataset>.json)")
    parser.add_argument("--all-cases", action="store_true", help="label every ok case, not only the unlabelled ones")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): the GPU with AMP when one is visible, else CPU")
    add_config_arguments(parser)


def _full_lut(cfg: dict, store, classes: list[str]):
    """label_full value -> VoComni channel, from the store's labels_full names and every pre-training card's map."""
    from voco.config import load_card
    from voco.errors import ConfigError, DataError
    from voco.omni.curation import full_truth_map, label_lut

    labels_full: dict = {}
    for cid in store.ids():  # the first readable case's map (a broken case is that case's verdict, not the job's)
        try:
            labels_full = store.load(cid).meta.get("labels_full") or {}
            break
        except DataError:
            continue
    if not labels_full:
        return None
    cards = []
    for d in dict.fromkeys(list(cfg["datasets"]["pretrain"]) + [store.dataset]):
        try:
            cards.append(load_card(d, cfg.get("cards_dir")))
        except ConfigError:
            continue
    return label_lut(labels_full, full_truth_map(cards), classes, f"{store.root} labels_full")


def _trained_classes(cfg: dict) -> list[str] | None:
    """VoComni classes present in the curated labels the stage-1 model learnt from (manifest column ``classes``)."""
    from voco.data.store import Store
    from voco.errors import DataError

    d = cfg["pretrain"]["omni"].get("labelled") or Path(cfg["paths"]["data"]) / "vocomni"
    try:
        m = Store(d).manifest
    except DataError:
        return None
    if "classes" not in m.columns:
        return None
    seen: set[str] = set()
    for s in m.loc[m["status"] == "ok", "classes"].dropna():
        seen |= set(json.loads(s))
    order = list(cfg["vocomni"]["classes"])
    return [c for c in order if c in seen]


def run(args: argparse.Namespace) -> int:

    from voco.data.store import Store
    from voco.errors import ConfigError
    from voco.omni.pseudolabel import merge, run_shard

    cfg = config_from_args(args)
    omni = cfg["pretrain"]["omni"]
    n_shards = int(args.num_shards or (cfg["preprocess"]["shards"] if (args.shard is not None or args.merge) else 1))
    dataset = args.out.name

    def report_path() -> Path:
        return args.report or Path(cfg["paths"]["results"]) / "omni" / f"pseudo_{dataset}.json"

    if not args.merge:
        if args.ckpt is None or args.prep is None:
            raise ConfigError("voco pseudolabel: --ckpt and --prep are needed to label a shard")
        from voco.omni.stages import load_stage_backbone

        model, ckpt_cfg = load_stage_backbone(args.ckpt)
        classes = list(ckpt_cfg["vocomni"]["classes"])
        roi = list(omni.get("roi") or cfg["preprocess"]["roi"])
        store = Store(args.prep)
        from voco.devices import select_device

        device = select_device(args.device)
        model.to(device)
        log.info("pseudo-labelling on %s%s", device, " with AMP" if device.type == "cuda" else "")
        df = run_shard(
            model, args.prep, args.out, classes, roi, _full_lut(cfg, store, classes),
            shard=args.shard, num_shards=n_shards if args.shard is not None else None,
            overlap=float(omni["pseudo_overlap"]), sw_batch_size=int(omni["sw_batch_size"]),
            min_confidence=float(omni["pseudo_min_confidence"]), device=device,
            labelled=None if args.all_cases else False,
        )
        log.info("%s shard %s: %d volumes pseudo-labelled, %d under the confidence threshold", store.dataset,
                 args.shard, len(df), int((df["status"] != "ok").sum()) if len(df) else 0)
        if args.shard is not None:
            return 0
        n_shards = 1
    if args.shard is None and not args.merge:
        # unsharded run: OUT/manifest.parquet is already the merged result; summarise it
        from voco.data.store import read_manifest
        from voco.io import atomic_path, write_json
        from voco.omni.pseudolabel import LOW_CONFIDENCE, summarise

        df = read_manifest(args.out / "manifest.parquet")
        with atomic_path(args.out / LOW_CONFIDENCE) as tmp:
            df[df["status"] != "ok"][["case_id", "dataset", "confidence", "reason"]].to_csv(tmp, index=False)
        summary = summarise(df, float(omni["pseudo_min_confidence"]), _trained_classes(cfg))
        summary["dataset"], summary["manifest"] = dataset, str(args.out / "manifest.parquet")
        write_json(report_path(), summary)
    else:
        summary = merge(args.out, n_shards, float(omni["pseudo_min_confidence"]), report_path(), _trained_classes(cfg))
    log.info("pseudo-labels %s: %d volumes, %d kept, %d dropped (listed in %s); Dice vs full truth %s -> %s",
             dataset, summary["cases"], summary["kept"], summary["dropped"], args.out / "low_confidence.csv",
             summary.get("dice_mean_trained_classes", summary.get("dice_mean")), report_path())
    return 0
