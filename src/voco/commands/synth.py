"""``voco synth``: write one phantom dataset (the embedded default data) in MSD layout.

Layout of ``--out DIR``::

    imagesTr/<case>.nii.gz   labelsTr/<case>.nii.gz (the card's classes, card values)   labelsFull/<case>.nii.gz
    imagesTs/<case>.nii.gz   labelsTs/<case>.nii.gz  labelsTsFull/<case>.nii.gz          (downstream test split)
    dicom/<case>/IM0001 ...  (DICOM cards: one file per slice instead of imagesTr; labels match the converted geometry)
    dataset.json             MSD keys + region, labels_full, voco_dataset, task (classification: "class" per entry)
    SOURCE.json              provenance (generator version, seeds, settings, sha256 of every file), written LAST
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from voco.config import add_config_arguments, config_from_args, load_card
from voco.data import phantom
from voco.errors import ConfigError
from voco.io import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

_SUBDIRS = ("imagesTr", "labelsTr", "labelsFull", "imagesTs", "labelsTs", "labelsTsFull", "dicom")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, help="dataset card id (config/datasets/<id>.yaml, source.kind synthetic)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/raw/<id>)")
    add_config_arguments(parser)
    parser.add_argument("--n-cases", type=int, default=None, help="generate only the first N cases (smoke tests)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    card = load_card(args.dataset, cfg["cards_dir"])
    info = synth_dataset(card, args.out, cfg["synth"]["seed"], cfg["synth"]["spacing_scale"], n_cases=args.n_cases)
    log.info("%s: wrote %d cases to %s", args.dataset, info["n_cases"], args.out)
    return 0


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Atomic NIfTI write with qform = sform = ``affine`` (scanner frame)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"voco phantom"
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _class_labels(card: dict) -> dict[str, str]:
    labels = {str(k): str(v) for k, v in card.get("labels", {}).items()}
    if card.get("task") == "classification":
        return labels or {"0": "no_tumour", "1": "tumour"}
    if labels:
        labels.setdefault("0", "background")
        unknown = [n for k, n in labels.items() if k != "0" and n not in phantom.LABEL_ID]
        if unknown:
            raise ConfigError(
                f"dataset card {card['id']}: labels {unknown} are not phantom classes "
                f"(known: {', '.join(list(phantom.LABEL_ID)[1:])})"
            )
    return dict(sorted(labels.items(), key=lambda kv: int(kv[0])))


def synth_dataset(
    card: dict, out: str | Path, base_seed: int, spacing_scale: float, n_cases: int | None = None
) -> dict:
    """Generate every case of a synthetic card into ``out`` and return the SOURCE.json record."""
    if card["source"]["kind"] != "synthetic" or "synthetic" not in card["source"]:
        raise ConfigError(f"dataset card {card['id']}: source.kind must be synthetic with a source.synthetic block")
    syn = card["source"]["synthetic"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "SOURCE.json").unlink(missing_ok=True)  # a partial folder never looks complete
    for sub in _SUBDIRS:  # stale cases of an earlier run must not linger
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    settings = phantom.PhantomSettings.from_card(syn, spacing_scale)
    task = card.get("task", "segmentation")
    labels = _class_labels(card)
    labelled = task == "segmentation" and len(labels) > 1
    total = int(syn["n_cases"])
    n_test = int(syn.get("n_test", 0))
    if n_test >= total:
        raise ConfigError(f"dataset card {card['id']}: source.synthetic.n_test ({n_test}) must be < n_cases ({total})")
    count = total if n_cases is None else max(1, min(total, int(n_cases)))
    use_dicom = bool(syn.get("dicom", False))
    if use_dicom and settings.orientation != "LPS":
        raise ConfigError(f"dataset card {card['id']}: DICOM output needs source.synthetic.orientation LPS")
    training, test = [], []
    for i in tqdm(range(count), desc=f"synth {card['id']}", unit="case", disable=None):
        cid = f"{card['id']}_{i:03d}"
        rng = phantom.case_rng(base_seed, int(syn.get("seed_offset", 0)), i)
        force = None
        if task == "classification" and syn.get("balanced_classes", False):
            force = bool(i % 2)
        case = phantom.generate_case(settings, rng, tumour=force)
        is_test = i >= total - n_test
        img_dir, lab_dir, full_dir = (
            ("imagesTs", "labelsTs", "labelsTsFull") if is_test else ("imagesTr", "labelsTr", "labelsFull")
        )
        entry: dict = {}
        label_full, label_aff = case.label, case.affine
        if use_dicom:
            from voco.data.dicom import write_series

            geo = write_series(
                case.image, case.affine, out / "dicom" / cid, case_id=cid, dataset=card["id"], seed=base_seed
            )
            # labels on the grid `voco convert` gives the series (same code path, same header values)
            stack = np.transpose(case.label, (2, 1, 0))  # (slices, rows, cols) in writing order
            label_full, label_aff = geo.to_volume(stack)
            entry["image"] = f"./dicom/{cid}"
        else:
            save_nifti(case.image, case.affine, out / img_dir / f"{cid}.nii.gz")
            entry["image"] = f"./{img_dir}/{cid}.nii.gz"
        if labelled:
            save_nifti(phantom.remap_labels(label_full, labels), label_aff, out / lab_dir / f"{cid}.nii.gz")
            entry["label"] = f"./{lab_dir}/{cid}.nii.gz"
        save_nifti(label_full.astype(np.uint8), label_aff, out / full_dir / f"{cid}.nii.gz")
        entry["label_full"] = f"./{full_dir}/{cid}.nii.gz"
        if task == "classification":
            entry["class"] = int(case.meta["tumour"])
        entry["meta"] = {k: case.meta[k] for k in ("fov", "spacing", "shape", "tumour")}
        (test if is_test else training).append(entry)

    doc = {
        "name": card.get("name", card["id"]),
        "description": card.get("description", "synthetic CT phantoms (voco.data.phantom)"),
        "reference": f"voco.data.phantom v{phantom.PHANTOM_VERSION}",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "modality": {str(k): v for k, v in card.get("modality", {"0": "CT"}).items()},
        "labels": labels,
        "labels_full": {str(k): v for k, v in phantom.PHANTOM_LABELS.items()},
        "region": card["region"],
        "voco_dataset": card["id"],
        "task": task,
        "format": "dicom" if use_dicom else "msd",
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    write_json(out / "dataset.json", doc)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "SOURCE.json" and not p.name.startswith("."))
    record = {
        "kind": "synthetic",
        "dataset": card["id"],
        "generator": "voco.data.phantom",
        "phantom_version": phantom.PHANTOM_VERSION,
        "seed": int(base_seed),
        "spacing_scale": float(spacing_scale),
        "settings": syn,
        "n_cases": count,
        "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files},
    }
    write_json(out / "SOURCE.json", record)
    return record
