"""Raw dataset layouts -> one MSD-style ``dataset.json`` (what ``voco convert`` writes).

Supported inputs (``--format``):

* ``msd``: ``dataset.json`` + ``imagesTr/`` ``labelsTr/`` ``imagesTs/`` (Medical Segmentation Decathlon). Nothing is
  copied: the output lists the input files (paths relative to the output folder).
* ``nnunet``: nnU-Net raw folder, ``imagesTr/<case>_0000.nii.gz`` (one file per channel), ``labelsTr/<case>.nii.gz``,
  ``imagesTs/``, ``dataset.json`` in v2 form (``channel_names``, ``labels`` name -> value) or v1 form (``modality``,
  ``labels`` value -> name).
* ``abdomenatlas``: ``<case>/ct.nii.gz`` + ``<case>/segmentations/<class>.nii.gz`` (AbdomenAtlas 1.x); the binary masks
  are merged into one label map per case (``labelsTr/<case>.nii.gz`` in the output folder).
* ``dicom``: one DICOM series per case folder (``dicom/<case>/`` or ``<case>/``), converted to
  ``imagesTr/<case>.nii.gz``; labels listed in an input ``dataset.json`` (``voco synth`` writes one) are carried over.

Every converter returns a :class:`Conversion`: the output document, plus the cases that failed (with the reason) and
warnings. One bad case never stops the others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from voco.errors import DataError, UnsafePathError
from voco.ids import check_id, safe_join
from voco.io import atomic_path
from voco.progressbar import track

log = logging.getLogger(__name__)

FORMATS = ("msd", "nnunet", "dicom", "abdomenatlas")
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_ENTRY_KEYS = ("image", "label", "label_full", "class", "case_id")


@dataclasses.dataclass
class Conversion:
    labels: dict[str, str]
    training: list[dict]
    test: list[dict]
    modality: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)  # labels_full, task ...
    failed: list[dict] = dataclasses.field(default_factory=list)  # {"case", "reason"}
    warnings: list[str] = dataclasses.field(default_factory=list)

    def fail(self, case: str, reason: str) -> None:
        log.warning("case %s failed: %s", case, reason)
        self.failed.append({"case": case, "reason": reason})

    def fail_with(self, case: str, e: BaseException, path: Path | None = None) -> None:
        """Record ``case`` as failed by exception ``e``: its type and message, and the file it was reading."""
        msg = str(e) or repr(e)
        if path is not None and str(path) not in msg:
            msg += f" (reading {path})"
        self.fail(case, f"{type(e).__name__}: {msg}")

    def warn(self, msg: str) -> None:
        log.warning("%s", msg)
        self.warnings.append(msg)


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(out).resolve())


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise DataError(f"{path}: top level must be an object")
    return doc


def _str_map(m: dict | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (m or {}).items()}


def _sorted_labels(m: dict[str, str]) -> dict[str, str]:
    return dict(sorted(m.items(), key=lambda kv: int(kv[0])))


def _case_name(path: str | Path) -> str:
    return _NIFTI.sub("", Path(path).name)


def save_label(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


# ------------------------------------------------------------------------------------------------------------- msd
def convert_msd(inp: Path, out: Path, card: dict) -> Conversion:
    """MSD folder: re-point the input ``dataset.json`` entries at the input files (no copying)."""
    doc = _read_json(inp / "dataset.json")
    conv = Conversion(
        labels=_sorted_labels(_str_map(doc.get("labels")) or _str_map(card.get("labels"))),
        training=[],
        test=[],
        modality=_str_map(doc.get("modality")),
    )
    for key in ("labels_full", "task"):
        if key in doc:
            conv.extra[key] = doc[key]
    for split, items in (("training", doc.get("training") or []), ("test", doc.get("test") or [])):
        for i, e in enumerate(items):
            e = {"image": e} if isinstance(e, str) else e
            if not isinstance(e, dict) or not e.get("image"):
                conv.fail(f"{split}[{i}]", f"{inp / 'dataset.json'}: entry is not a path or an object with 'image'")
                continue
            if e.get("case_id") not in (None, ""):
                try:
                    check_id(e["case_id"], f"{inp / 'dataset.json'}: {split} entry {i}: case_id")
                except UnsafePathError as err:
                    conv.fail(f"{split}[{i}]", f"{type(err).__name__}: {err}")
                    continue
            try:
                new = _msd_entry(e, inp, out, conv, f"{split} entry {i}")
            except Exception as err:  # noqa: BLE001 - one entry, one verdict
                conv.fail_with(f"{split}[{i}]", err, inp / "dataset.json")
                continue
            (conv.training if split == "training" else conv.test).append(new)
    return conv


def _msd_entry(e: dict, inp: Path, out: Path, conv: Conversion, where: str) -> dict:
    """One MSD entry with its paths re-pointed from ``inp`` to ``out`` (missing files are warned about)."""
    new = {}
    for k in _ENTRY_KEYS:
        if k not in e:
            continue
        if k in ("image", "label", "label_full"):
            paths = e[k] if isinstance(e[k], list) else [e[k]]
            if not paths or not all(isinstance(p, str) and p for p in paths):
                raise DataError(f"{inp / 'dataset.json'}: {where}: {k} must be a file path or a list of them")
            for p in paths:
                if not (inp / p).exists():
                    conv.warn(f"{where}: {k} {inp / p} does not exist (pre-processing will reject it)")
            rel = [_rel(inp / p, out) for p in paths]
            new[k] = rel if isinstance(e[k], list) else rel[0]
        else:
            new[k] = e[k]
    return new


# ---------------------------------------------------------------------------------------------------------- nnU-Net
def convert_nnunet(inp: Path, out: Path, card: dict) -> Conversion:
    """nnU-Net raw folder (v2 or v1 dataset.json) -> MSD form; multi-channel cases list one file per channel."""
    dj = inp / "dataset.json"
    doc = _read_json(dj) if dj.is_file() else {}
    raw_labels = doc.get("labels") or {}
    labels: dict[str, str] = {}
    if raw_labels and all(str(k).lstrip("-").isdigit() for k in raw_labels):  # v1: value -> name
        labels = _str_map(raw_labels)
    else:  # v2: name -> value (region-based training lists several values)
        for name, value in raw_labels.items():
            if isinstance(value, list | tuple):
                raise DataError(f"{dj}: label {name!r} is region-based ({value}); only plain label maps are supported")
            labels[str(int(value))] = str(name)
    labels = labels or _str_map(card.get("labels"))
    channels = (
        _str_map(doc.get("channel_names") or doc.get("modality")) or _str_map(card.get("modality")) or {"0": "CT"}
    )
    ending = str(doc.get("file_ending", ".nii.gz"))
    conv = Conversion(labels=_sorted_labels(labels), training=[], test=[], modality=channels)
    if not _NIFTI.search("x" + ending):
        raise DataError(f"{dj}: file_ending {ending!r} is not supported (NIfTI .nii.gz / .nii only)")
    for split, img_dir, lab_dir in (("training", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        folder = inp / img_dir
        if not folder.is_dir():
            if split == "training":
                raise DataError(f"{inp}: no imagesTr/ folder (not an nnU-Net raw dataset?)")
            continue
        cases = sorted(
            {
                re.sub(r"_\d{4}$", "", f.name[: -len(ending)])
                for f in folder.iterdir()
                if f.name.endswith(ending) and not f.name.startswith(".")
            }
        )
        for case in cases:
            try:
                check_id(case, f"{folder}: case name")
            except UnsafePathError as err:
                conv.fail(case, f"{type(err).__name__}: {err}")
                continue
            files = [folder / f"{case}_{int(c):04d}{ending}" for c in sorted(channels, key=int)]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                conv.fail(case, f"{folder}: missing channel file(s) {', '.join(missing)} for {len(channels)} channels")
                continue
            entry: dict = {"image": _rel(files[0], out) if len(files) == 1 else [_rel(f, out) for f in files]}
            label = inp / lab_dir / f"{case}{ending}"
            if label.is_file():
                entry["label"] = _rel(label, out)
            elif split == "training":
                conv.fail(case, f"{label}: label file missing")
                continue
            (conv.training if split == "training" else conv.test).append(entry)
    n_declared = doc.get("numTraining")
    if isinstance(n_declared, int) and n_declared != len(conv.training):
        conv.warn(f"{dj}: numTraining is {n_declared} but imagesTr holds {len(conv.training)} complete cases")
    return conv


# ----------------------------------------------------------------------------------------------------- AbdomenAtlas
def convert_abdomenatlas(inp: Path, out: Path, card: dict) -> Conversion:
    """``<case>/ct.nii.gz`` + ``<case>/segmentations/<class>.nii.gz`` -> merged label maps in ``out/labelsTr``."""
    card_labels = {k: v for k, v in _str_map(card.get("labels")).items() if k != "0"}
    case_dirs = sorted(d for d in inp.iterdir() if d.is_dir() and (d / "ct.nii.gz").is_file())
    if not case_dirs:
        raise DataError(f"{inp}: no <case>/ct.nii.gz folders (not an AbdomenAtlas layout?)")
    if card_labels:
        classes = [card_labels[k] for k in sorted(card_labels, key=int)]
        values = [int(k) for k in sorted(card_labels, key=int)]
    else:
        names = sorted({_case_name(f) for d in case_dirs for f in (d / "segmentations").glob("*.nii*")})
        classes, values = names, list(range(1, len(names) + 1))
    if max(values, default=0) > 255:
        raise DataError(f"{inp}: more than 255 classes")
    conv = Conversion(
        labels=_sorted_labels({"0": "background", **{str(v): c for v, c in zip(values, classes, strict=True)}}),
        training=[],
        test=[],
        modality={"0": "CT"},
    )
    ignored: set[str] = set()
    for d in track(case_dirs, f"convert {card.get('id', inp.name)}", logger=log):
        case = d.name
        try:
            dest = safe_join(out, "labelsTr", check_id(case, f"{inp}: case folder name") + ".nii.gz")
            ct = nib.load(d / "ct.nii.gz")
            shape, affine = ct.shape[:3], ct.affine
            label = np.zeros(shape, np.uint8)
            seg_dir = d / "segmentations"
            present = {_case_name(f): f for f in seg_dir.glob("*.nii*")} if seg_dir.is_dir() else {}
            ignored |= set(present) - set(classes)
            absent = [c for c in classes if c not in present]
            for value, cls in zip(values, classes, strict=True):
                if cls not in present:
                    continue
                m = nib.load(present[cls])
                if m.shape[:3] != tuple(shape):
                    raise DataError(f"{present[cls]}: mask shape {m.shape} does not match ct.nii.gz {tuple(shape)}")
                if np.abs(m.affine - affine).max() > 1e-3:
                    raise DataError(f"{present[cls]}: mask affine does not match ct.nii.gz")
                label[np.asarray(m.dataobj).reshape(shape) > 0] = value
            if absent:
                conv.warn(f"{case}: no mask for {', '.join(absent)} (treated as background)")
        except Exception as e:  # noqa: BLE001 - one case, one verdict: a bad file fails this case only
            conv.fail_with(case, e, d)
            continue
        save_label(label, affine, dest)  # writing: a failure here is the job's (unwritable output), not the case's
        conv.training.append({"image": _rel(d / "ct.nii.gz", out), "label": _rel(dest, out), "case_id": case})
    if ignored:
        conv.warn(f"masks not in the card's label map were ignored: {', '.join(sorted(ignored))}")
    return conv


# ------------------------------------------------------------------------------------------------------------ DICOM
def _series_folders(inp: Path) -> list[tuple[str, Path]]:
    base = inp / "dicom" if (inp / "dicom").is_dir() else inp
    subdirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    series = [(d.name, d) for d in subdirs if any(p.is_file() for p in d.rglob("*"))]
    if not series and any(p.is_file() and p.suffix not in (".json",) for p in base.iterdir()):
        series = [(base.name, base)]  # the folder itself is one series
    return series


def convert_dicom(inp: Path, out: Path, card: dict) -> Conversion:
    """One DICOM series per case folder -> ``out/imagesTr/<case>.nii.gz`` (or ``imagesTs`` for test entries)."""
    from voco.data import dicom

    dj = inp / "dataset.json"
    conv = Conversion(labels=_sorted_labels(_str_map(card.get("labels"))), training=[], test=[], modality={"0": "CT"})
    jobs: list[tuple[str, str, Path, dict]] = []  # (split, case, folder, extra entry keys)
    if dj.is_file():
        doc = _read_json(dj)
        conv.labels = _sorted_labels(_str_map(doc.get("labels"))) or conv.labels
        conv.modality = _str_map(doc.get("modality")) or conv.modality
        for key in ("labels_full", "task"):
            if key in doc:
                conv.extra[key] = doc[key]
        for split in ("training", "test"):
            for i, e in enumerate(doc.get(split) or []):
                e = {"image": e} if isinstance(e, str) else e
                if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not e["image"]:
                    conv.fail(f"{split}[{i}]", f"{dj}: entry is not a path or an object with 'image'")
                    continue
                folder = inp / e["image"]
                extra = {
                    k: (_rel(inp / e[k], out) if k in ("label", "label_full") else e[k])
                    for k in _ENTRY_KEYS[1:]
                    if k in e
                }
                jobs.append((split, e.get("case_id") or Path(e["image"]).name, folder, extra))
    else:
        jobs = [("training", case, folder, {}) for case, folder in _series_folders(inp)]
    if not jobs:
        raise DataError(f"{inp}: no DICOM series folders found")
    for split, case, folder, extra in track(jobs, f"convert {card.get('id', inp.name)} (DICOM)", unit="series", logger=log):
        sub = "imagesTr" if split == "training" else "imagesTs"
        try:
            dest = safe_join(out, sub, check_id(case, f"{inp}: case id") + ".nii.gz")
        except UnsafePathError as e:
            conv.fail(str(case), f"{type(e).__name__}: {e}")
            continue
        try:
            vol = dicom.read_series(folder)
        except Exception as e:  # noqa: BLE001 - one series, one verdict: a bad slice fails this series only
            conv.fail_with(case, e, folder)
            continue
        dicom.write_nifti(vol, dest)  # writing: a failure here is the job's (unwritable output), not the case's
        entry = {"image": _rel(dest, out), **extra}
        (conv.training if split == "training" else conv.test).append(entry)
    return conv


CONVERTERS = {
    "msd": convert_msd,
    "nnunet": convert_nnunet,
    "dicom": convert_dicom,
    "abdomenatlas": convert_abdomenatlas,
}


def dataset_document(conv: Conversion, card: dict, fmt: str) -> dict:
    """The output ``dataset.json``: MSD keys + region, voco_dataset, task (card values win for region / id)."""
    labels = conv.labels
    card_labels = _str_map(card.get("labels"))
    if card_labels and labels and card_labels != labels:
        conv.warn(f"the input's label map {labels} differs from the card's {card_labels}; using the input's")
    labels = labels or card_labels
    if card.get("task", "segmentation") == "segmentation" and labels:
        labels.setdefault("0", "background")
        labels = _sorted_labels(labels)
    doc = {
        "name": card.get("name", card["id"]),
        "description": card.get("description", ""),
        "tensorImageSize": "3D",
        "modality": conv.modality or _str_map(card.get("modality")) or {"0": "CT"},
        "labels": labels,
        "region": card["region"],
        "voco_dataset": card["id"],
        "task": conv.extra.get("task", card.get("task", "segmentation")),
        "source_format": fmt,
        "numTraining": len(conv.training),
        "numTest": len(conv.test),
    }
    if "labels_full" in conv.extra:
        doc["labels_full"] = conv.extra["labels_full"]
    doc["training"] = conv.training
    doc["test"] = conv.test
    if conv.failed:  # pre-processing records them as rejected cases in the manifest
        doc["voco_rejected"] = [{"case": f["case"], "reason": f"convert: {f['reason']}"} for f in conv.failed]
    return doc
