"""VoComni curation (SPEC 3): complete partial labels with an ensemble, score every volume, drop the unsure ones.

Pure array functions (tested alone) come first; :func:`run_curation` wires them to the store, the shared training
loop and the output files.

Class spaces: every source card maps its own class names to the VoComni classes (``vocomni_map``); a class the card
does not map is treated as background. A source *annotates* the VoComni classes its ``annotated`` names map to; in the
source's label, background therefore means "background or a class this source does not annotate".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voco.data.store import Store
from voco.errors import ConfigError, DataError
from voco.omni.labelmaps import confidence, map_label, per_class_dice  # noqa: F401 - part of this module's API

log = logging.getLogger(__name__)

#: The 21 VoComni output channels (SPEC 3), in channel order. ``vocomni.classes`` in the config may replace it.
VOCOMNI_CLASSES: tuple[str, ...] = (
    "background",
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "ivc",
    "portal_splenic_veins",
    "pancreas",
    "adrenal_right",
    "adrenal_left",
    "liver_tumour",
    "pancreas_tumour",
    "kidney_tumour",
    "covid_lesion",
    "colon",
    "colon_cancer",
    "lung_cancer",
)

_SEP = re.compile(r"[\s\-/]+")


def normalise_name(name: str) -> str:
    """Class-name key for matching: lower case, spaces / hyphens / slashes -> ``_`` (``"Right Kidney"`` -> ``right_kidney``)."""
    return _SEP.sub("_", str(name).strip().lower())


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """VoComni name (normalised) -> channel index."""
    return {normalise_name(c): i for i, c in enumerate(classes)}


def label_lut(
    labels: Mapping[int | str, str],
    vocomni_map: Mapping[str, str],
    classes: Sequence[str] = VOCOMNI_CLASSES,
    where: str = "dataset card",
) -> np.ndarray:
    """Look-up table: source label value -> VoComni channel.

    A source class maps through ``vocomni_map`` (by its name); a class absent from the map whose name is itself a
    VoComni class maps to that class; every other class maps to background (0).

    Args:
        labels: the source's label map, value -> class name (MSD style, keys may be strings).
        vocomni_map: source class name -> VoComni class name.
        classes: the VoComni classes (channel order).
        where: named in error messages (the card or dataset.json).

    Returns:
        uint8 array of length max(label value) + 1.

    Raises:
        ConfigError: a ``vocomni_map`` target is not a VoComni class.
    """
    idx = class_index(classes)
    vmap = {normalise_name(k): normalise_name(v) for k, v in vocomni_map.items()}
    for src, dst in vmap.items():
        if dst not in idx:
            raise ConfigError(
                f"{where}: vocomni_map maps {src!r} to {dst!r}, which is not a VoComni class "
                f"(known: {', '.join(classes)})"
            )
    values = {int(k): normalise_name(v) for k, v in labels.items()}
    size = max(values, default=0) + 1
    lut = np.zeros(max(size, 1), dtype=np.uint8)
    for value, name in values.items():
        if value == 0:
            continue
        target = vmap.get(name, name)
        lut[value] = idx.get(target, 0)
    return lut


def annotated_channels(
    annotated: Sequence[str],
    vocomni_map: Mapping[str, str],
    classes: Sequence[str] = VOCOMNI_CLASSES,
) -> np.ndarray:
    """Boolean mask (C,) of the VoComni channels a source annotates; background (channel 0) is always True."""
    idx = class_index(classes)
    vmap = {normalise_name(k): normalise_name(v) for k, v in vocomni_map.items()}
    mask = np.zeros(len(classes), dtype=bool)
    mask[0] = True
    for name in annotated:
        n = normalise_name(name)
        target = vmap.get(n, n)
        if target in idx:
            mask[idx[target]] = True
    return mask


def fuse(member_probs: Sequence[np.ndarray], learnable: np.ndarray | None = None) -> np.ndarray:
    """Average the members' softmax maps.

    Args:
        member_probs: K arrays (C, X, Y, Z), each summing to 1 over C.
        learnable: optional bool (C,): the classes some source annotates (background included). The members never
            saw the others (the marginal loss folds them into background), so their probability is moved to
            background.

    Returns:
        float32 (C, X, Y, Z) ensemble probabilities.
    """
    if not member_probs:
        raise ValueError("fuse: no ensemble members")
    out = np.zeros(member_probs[0].shape, dtype=np.float32)
    for p in member_probs:
        if p.shape != out.shape:
            raise ValueError(f"fuse: member shapes differ {p.shape} vs {out.shape}")
        out += p
    out /= len(member_probs)
    if learnable is not None:
        drop = ~np.asarray(learnable, dtype=bool)
        drop[0] = False
        if drop.any():
            out[0] += out[drop].sum(0)
            out[drop] = 0.0
    return out


def complete_label(own: np.ndarray, annotated: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Keep the source's annotated classes exactly and fill the others from the ensemble.

    Where the source label is foreground it is kept. Elsewhere (source background = background or an unannotated
    class) the voxel takes the ensemble argmax restricted to background and the classes the source does not annotate:
    an annotated class is known to be absent there.

    Args:
        own: source label in VoComni channels (X, Y, Z), non-zero only on annotated classes.
        annotated: bool (C,) from :func:`annotated_channels`.
        probs: ensemble probabilities (C, X, Y, Z).

    Returns:
        uint8 (X, Y, Z) completed label.
    """
    annotated = np.asarray(annotated, dtype=bool)
    if probs.shape[0] != annotated.shape[0] or probs.shape[1:] != own.shape:
        raise ValueError(f"complete_label: probs {probs.shape}, annotated {annotated.shape}, label {own.shape}")
    allowed = ~annotated
    allowed[0] = True
    channels = np.flatnonzero(allowed)
    fill = channels[np.argmax(probs[channels], axis=0)].astype(np.uint8)
    return np.where(own > 0, own, fill).astype(np.uint8)


def agreement(member_preds: Sequence[np.ndarray]) -> float:
    """Member agreement: the fraction of voxels predicted foreground by any member on which all members agree.

    1.0 for a single member, or when no member predicts foreground.
    """
    if len(member_preds) < 2:
        return 1.0
    first = member_preds[0]
    union = first > 0
    same = np.ones(first.shape, dtype=bool)
    for p in member_preds[1:]:
        union |= p > 0
        same &= p == first
    n = int(union.sum())
    return 1.0 if n == 0 else float(same[union].sum()) / n


# ------------------------------------------------------------------------------------------------ sources (I/O)
@dataclass
class Source:
    """One partially labelled source: its store, card and the maps into VoComni channels."""

    store: Store
    dataset: str
    lut: np.ndarray  # source label value -> VoComni channel
    annotated: np.ndarray  # bool (C,)
    full_lut: np.ndarray | None  # label_full value -> VoComni channel (phantoms), None if no label_full

    def label(self, case_id: str) -> np.ndarray:
        case = self.store.load(case_id)
        if case.label is None:
            raise DataError(f"{self.store.root}: case {case_id} has no label")
        return map_label(case.label, self.lut, f"{self.store.root}/{case_id} label")

    def label_full(self, case_id: str) -> np.ndarray | None:
        case = self.store.load(case_id)
        if case.label_full is None or self.full_lut is None:
            return None
        return map_label(case.label_full, self.full_lut, f"{self.store.root}/{case_id} label_full")


def full_truth_map(cards: Sequence[Mapping]) -> dict[str, str]:
    """Phantom full-truth class name -> VoComni class: the union of every card's ``vocomni_map``."""
    out: dict[str, str] = {}
    for card in cards:
        for k, v in (card.get("vocomni_map") or {}).items():
            out.setdefault(normalise_name(k), normalise_name(v))
    return out


def open_sources(prep_dirs: Sequence[str | Path], cfg: Mapping, classes: Sequence[str]) -> list[Source]:
    """Open each labelled source store and build its VoComni maps from its dataset card.

    Raises:
        DataError: a store has no ok labelled case.
        ConfigError: a card maps to an unknown VoComni class or annotates nothing VoComni knows.
    """
    from voco.config import load_card

    stores = [Store(p) for p in prep_dirs]
    cards = [load_card(s.dataset, cfg.get("cards_dir")) for s in stores]
    full_map = full_truth_map(cards)
    out = []
    for store, card in zip(stores, cards, strict=True):
        ids = store.ids(labelled=True)
        if not ids:
            raise DataError(f"{store.root}: no ok labelled case: VoComni curation needs labelled sources")
        meta = store.load(ids[0]).meta
        where = f"config/datasets/{card['id']}.yaml"
        labels = meta.get("labels") or card.get("labels") or {}
        vmap = card.get("vocomni_map") or {}
        lut = label_lut(labels, vmap, classes, where)
        ann = annotated_channels(card.get("annotated") or [v for k, v in labels.items() if str(k) != "0"], vmap, classes)
        if ann.sum() <= 1:
            raise ConfigError(f"{where}: none of the annotated classes maps to a VoComni class (check vocomni_map)")
        labels_full = meta.get("labels_full") or {}
        full_lut = label_lut(labels_full, full_map, classes, where) if labels_full else None
        out.append(Source(store, store.dataset, lut, ann, full_lut))
    return out


# ------------------------------------------------------------------------------------------------ curation run
def _class_means(per_case: list[dict[str, float]]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for d in per_case:
        for k, v in d.items():
            if np.isfinite(v):
                acc.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _mean(d: Mapping[str, float], keys: Sequence[str] | None = None) -> float | None:
    vals = [v for k, v in d.items() if keys is None or k in keys]
    return float(np.mean(vals)) if vals else None


def _dice_dicts(
    pred: np.ndarray, truth: np.ndarray, annotated: np.ndarray, classes: Sequence[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-class Dice split into (given = annotated by the source, filled = not annotated); absent classes skipped."""
    d = per_class_dice(pred, truth, len(classes))
    given, filled = {}, {}
    for i in range(1, len(classes)):
        if np.isfinite(d[i]):
            (given if annotated[i] else filled)[classes[i]] = float(d[i])
    return given, filled


def _member_models(cfg: Mapping, classes: Sequence[str], pool, work_dir: Path, roi: Sequence[int]) -> list:
    """Train (or resume, or reuse) the ensemble members in ``work_dir/member-<k>/``.

    Each member's checkpoints record its identity (its settings, the sources' manifests): a member folder of other
    settings is retrained from scratch (saying what differs), never reused. The members' resumable ``last.pt`` stay
    until the curation's outputs exist (:func:`run_curation` removes them), so a retried job resumes every member.
    """
    import torch

    from voco.models import build_model
    from voco.omni.stage import RestrictedOutputs, train_supervised
    from voco.train.checkpoint import run_identity, store_manifests

    vc = cfg["vocomni"]
    learnable = np.zeros(len(classes), dtype=bool)
    for s in pool.sources:
        learnable |= s.annotated
    models, info = [], []
    for k, m in enumerate(vc["members"]):
        run_dir = work_dir / f"member-{k}"
        run_config = {"vocomni_member": dict(m), "classes": list(classes), "steps": vc["steps"], "lr": vc["lr"],
                      "crops_per_step": vc["crops_per_step"], "pos_neg": list(vc["pos_neg"]), "roi": list(roi),
                      "sources": [str(s.store.root) for s in pool.sources]}
        identity = run_identity({k: v for k, v in run_config.items() if k != "sources"},
                                data=store_manifests([s.store.root for s in pool.sources]))
        torch.manual_seed(int(m["seed"]))
        model = RestrictedOutputs(build_model(m["model"], in_channels=1, out_channels=len(classes),
                                             size=m.get("size", "B"), feature_size=m.get("feature_size")), learnable)
        res = train_supervised(
            model, pool, run_dir, vc["steps"], roi, vc["crops_per_step"], vc["pos_neg"], vc["lr"],
            vc["weight_decay"], seed=int(m["seed"]), stage="member", method="vocomni", run_config=run_config,
            identity=identity, finish=False,
        )
        model.eval()
        models.append(model)
        if not res.last:  # resumed from a finished run: its last logged record
            from voco.train.progress import read_metrics

            recs = read_metrics(run_dir / "metrics.jsonl")
            res.last = recs[-1] if recs else {}
        info.append({"member": k, **m, "steps": res.step, "final_loss": res.last.get("total"),
                     "wall_s": round(res.wall_s, 2), "checkpoint": str(res.final)})
    return models, info


def run_curation(
    prep_dirs: Sequence[str | Path],
    out_dir: str | Path,
    cfg: Mapping,
    work_dir: str | Path,
    report_json: str | Path | None = None,
) -> dict:
    """VoComni curation: train the ensemble, complete every labelled source volume, score, drop, write.

    Writes ``out_dir/manifest.parquet`` (a store: kept volumes ``ok``, dropped ones ``rejected`` with the reason),
    ``out_dir/cases/<dataset>__<case>/{label.npy, fg.npy, meta.json}`` (images stay in the source stores),
    ``out_dir/curation.parquet`` (one row per volume), ``out_dir/curation.png`` and ``report_json`` (Dice of the
    completed labels against the full truth where the store has ``label_full``).

    Returns:
        the summary written to ``report_json``.
    """
    import json
    import time

    import pandas as pd
    from tqdm import tqdm

    from voco.data.store import MANIFEST, write_manifest
    from voco.errors import Interrupted
    from voco.eval.inference import predict_probs
    from voco.io import atomic_path, write_json
    from voco.omni.pseudolabel import write_label_case
    from voco.omni.stage import LabelledPool, PoolSource
    from voco.train import preempt
    from voco.train.checkpoint import finish_run

    t0 = time.perf_counter()
    vc = cfg["vocomni"]
    classes = list(vc["classes"])
    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = open_sources(prep_dirs, cfg, classes)
    roi = list(vc.get("roi") or cfg["preprocess"]["roi"])
    pool = LabelledPool([PoolSource(s.store, s.lut, s.annotated) for s in sources], len(classes))
    log.info("VoComni: %d labelled volumes from %s; ensemble of %d", len(pool), [s.dataset for s in sources],
             len(vc["members"]))
    members, member_info = _member_models(cfg, classes, pool, work, roi)
    learnable = np.zeros(len(classes), dtype=bool)
    for s in sources:
        learnable |= s.annotated
    learnable[0] = False
    learnable_bg = learnable.copy()
    learnable_bg[0] = True
    learnable_names = [classes[i] for i in np.flatnonzero(learnable)]

    rows, table = [], []
    dice_rows: dict[str, list[dict[str, float]]] = {k: [] for k in
                                                    ("completed_filled", "completed_given", "partial_filled",
                                                     "ensemble_all", "completed_filled_kept")}
    for s in sources:
        for cid in tqdm(s.store.ids(labelled=True), desc=f"vocomni {s.dataset}", mininterval=10, disable=None):
            if preempt.requested():  # the members are checkpointed; the completion reruns on the next attempt
                raise Interrupted(preempt.requested() or "a stop signal", None,
                                  ", ".join(str(i["checkpoint"]) for i in member_info))
            case = s.store.load(cid)
            import torch

            with torch.no_grad():
                member_probs = [predict_probs(m, case.image, roi, overlap=vc["overlap"],
                                              sw_batch_size=vc["sw_batch_size"]).numpy() for m in members]
            probs = fuse(member_probs, learnable_bg)
            preds = [fuse([p], learnable_bg).argmax(0) for p in member_probs]
            del member_probs
            own = s.label(cid)
            completed = complete_label(own, s.annotated, probs)
            conf, n_fg = confidence(probs)
            agr = agreement(preds)
            reasons = []
            if conf < vc["min_confidence"]:
                reasons.append(f"confidence {conf:.3f} < {vc['min_confidence']}")
            if agr < vc["min_agreement"]:
                reasons.append(f"agreement {agr:.3f} < {vc['min_agreement']}")
            kept = not reasons
            filled_classes = sorted({classes[i] for i in np.unique(completed) if i and not s.annotated[i]})
            truth = s.label_full(cid)
            rec: dict = {}
            if truth is not None:
                given, filled = _dice_dicts(completed, truth, s.annotated, classes)
                _, partial = _dice_dicts(own, truth, s.annotated, classes)
                ens = {classes[i]: float(v) for i, v in enumerate(per_class_dice(probs.argmax(0), truth, len(classes)))
                       if i and np.isfinite(v)}
                dice_rows["completed_filled"].append(filled)
                dice_rows["completed_given"].append(given)
                dice_rows["partial_filled"].append(partial)
                dice_rows["ensemble_all"].append(ens)
                if kept:
                    dice_rows["completed_filled_kept"].append(filled)
                rec = {"dice_filled": _mean(filled, learnable_names), "dice_given": _mean(given),
                       "dice_partial_filled": _mean(partial, learnable_names)}
            uid = f"{s.dataset}__{cid}"
            paths = write_label_case(
                out, uid, s.store, cid, completed,
                {"vocomni": {"source_dataset": s.dataset, "source_case_id": cid, "confidence": conf,
                             "agreement": agr, "kept": kept, "annotated": [classes[i] for i in np.flatnonzero(s.annotated)
                                                                           if i],
                             "filled": filled_classes}},
                classes,
            )
            src = s.store.row(cid)
            present = [classes[i] for i in np.unique(completed) if i]
            rows.append({
                **{k: src.get(k) for k in ("region", "shape", "spacing", "split", "class", "key", "index", "n_channels",
                                           "original_shape", "original_spacing")},
                "case_id": uid, "dataset": s.dataset, "status": "ok" if kept else "rejected",
                "reason": "; ".join(reasons), "labelled": True, **paths, "source": str(s.store.root),
                "source_case_id": cid, "confidence": conf, "agreement": agr, "classes": json.dumps(present),
            })
            table.append({"case_id": uid, "dataset": s.dataset, "source_case_id": cid, "confidence": conf,
                          "agreement": agr, "fg_voxels": n_fg, "kept": kept, "reason": "; ".join(reasons),
                          "filled_classes": json.dumps(filled_classes), **rec})
            log.info("%s: confidence %.3f agreement %.3f %s%s", uid, conf, agr, "kept" if kept else "DROPPED",
                     f" Dice(filled) {rec['dice_filled']:.3f}" if rec.get("dice_filled") is not None else "")
    write_manifest(rows, out / MANIFEST)
    if rows and not any(r["status"] == "ok" for r in rows):
        log.warning("VoComni: every volume is under the thresholds (min_confidence %s, min_agreement %s): the store "
                    "has no ok case and stage 1 cannot run; train the ensemble longer or lower the thresholds",
                    vc["min_confidence"], vc["min_agreement"])
    df = pd.DataFrame(table)
    with atomic_path(out / "curation.parquet") as tmp:
        df.to_parquet(tmp, index=False)

    means = {k: _class_means(v) for k, v in dice_rows.items()}
    summary = {
        "classes": classes,
        "sources": {s.dataset: {"annotated": [classes[i] for i in np.flatnonzero(s.annotated) if i],
                                "volumes": len(s.store.ids(labelled=True))} for s in sources},
        "learnable_classes": learnable_names,
        "volumes": int(len(df)),
        "kept": int(df["kept"].sum()) if len(df) else 0,
        "dropped": int((~df["kept"]).sum()) if len(df) else 0,
        "dropped_cases": df.loc[~df["kept"], "case_id"].tolist() if len(df) else [],
        "thresholds": {"min_confidence": vc["min_confidence"], "min_agreement": vc["min_agreement"]},
        "confidence": {"mean": float(df["confidence"].mean()), "min": float(df["confidence"].min())} if len(df) else {},
        "agreement": {"mean": float(df["agreement"].mean()), "min": float(df["agreement"].min())} if len(df) else {},
        "full_truth_volumes": len(dice_rows["completed_filled"]),
        "dice": {
            # filled = classes a volume's source does not annotate, completed by the ensemble
            "completed_filled_per_class": means["completed_filled"],
            "completed_filled_mean": _mean(means["completed_filled"], learnable_names),
            "completed_filled_mean_kept": _mean(means["completed_filled_kept"], learnable_names),
            "completed_given_mean": _mean(means["completed_given"]),
            "partial_filled_per_class": means["partial_filled"],
            "partial_filled_mean": _mean(means["partial_filled"], learnable_names),
            "ensemble_per_class": means["ensemble_all"],
            "ensemble_mean": _mean(means["ensemble_all"], learnable_names),
            "unlearnable_filled_per_class": {k: v for k, v in means["completed_filled"].items()
                                             if k not in learnable_names},
        },
        "members": member_info,
        "wall_s": round(time.perf_counter() - t0, 1),
        "out": str(out),
    }
    plot_curation(df, summary, out / "curation.png")
    if report_json:
        write_json(report_json, summary)
    for k in range(len(vc["members"])):  # the job's outputs are complete: the members' resumable checkpoints can go
        finish_run(work / f"member-{k}")
    return summary


def plot_curation(df, summary: Mapping, png: Path) -> None:
    """Two panels: per-volume confidence vs agreement (kept / dropped, thresholds); Dice of filled classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voco.io import atomic_path

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ds, g in df.groupby("dataset") if len(df) else []:
        for kept, marker in ((True, "o"), (False, "x")):
            gg = g[g["kept"] == kept]
            if len(gg):
                a.scatter(gg["confidence"], gg["agreement"], marker=marker, label=f"{ds} ({'kept' if kept else 'dropped'})")
    th = summary["thresholds"]
    a.axvline(th["min_confidence"], color="k", ls="--", lw=0.8)
    a.axhline(th["min_agreement"], color="k", ls=":", lw=0.8)
    a.set_xlabel("confidence (mean ensemble max-prob over predicted foreground)")
    a.set_ylabel("member agreement")
    a.set_title(f"VoComni curation: {summary['kept']} kept, {summary['dropped']} dropped")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    d = summary["dice"]
    names = sorted(set(d["completed_filled_per_class"]) | set(d["ensemble_per_class"]))
    x = np.arange(len(names))
    part = summary["dice"].get("partial_filled_per_class", {})
    b.bar(x - 0.2, [part.get(n, 0.0) for n in names], 0.4, label="source label (partial)")
    b.bar(x + 0.2, [d["completed_filled_per_class"].get(n, np.nan) for n in names], 0.4, label="completed")
    b.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    b.set_ylim(0, 1)
    b.set_ylabel("Dice vs full truth (classes the source lacks)")
    b.set_title("label completion")
    b.legend(fontsize=7)
    b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
