"""Reading MSD-style ``dataset.json`` files: entries, label maps, region tag, splits.

The format (written by ``voco convert`` and ``voco synth``)::

    {"name": ..., "labels": {"0": "background", "1": "liver"}, "modality": {"0": "CT"},
     "region": "abdomen", "voco_dataset": "phantom_src_a", "labels_full": {...},
     "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "label_full": ..., "class": 1}],
     "test": ["imagesTs/b.nii.gz", {"image": "imagesTs/c.nii.gz"}]}

Paths are relative to the dataset.json's folder (absolute paths are accepted). An image may also be a list of files
(one per channel, nnU-Net ``_0000``/``_0001`` style). Reading is lenient about each *entry* (problems with the files an
entry names are found later, per case, by pre-processing) but strict about the file's structure.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from voco.errors import DataError, UnsafePathError
from voco.ids import check_id

_NIFTI_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.npy)$", re.IGNORECASE)
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")
_ID_CLEAN = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Entry:
    """One case listed in a dataset.json.

    Attributes:
        index: position in the dataset.json (training entries first, then test), the stable order used for sharding.
        case_id: unique id derived from the image file name (``<name>`` of ``<name>[_0000].nii.gz``).
        images: one path per channel (absolute).
        label: label file or None (unlabelled pool / test case).
        label_full: full-truth label file (phantoms) or None.
        split: ``train`` (from ``training``) or ``test``.
        cls: classification target, -1 when the entry has none.
        problem: why the entry cannot be processed (an unsafe case id ...), None when it can; such an entry is kept
            (so that it is reported as a rejected case) but nothing is ever written under its id.
    """

    index: int
    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    label_full: Path | None
    split: str
    cls: int = -1
    problem: str | None = None


@dataclass
class DatasetInfo:
    """The parsed dataset.json."""

    path: Path
    name: str
    labels: dict[int, str]
    labels_full: dict[int, str]
    modality: dict[int, str]  # empty when the dataset.json has none (the card's, else CT, applies)
    region: str | None
    voco_dataset: str | None
    entries: list[Entry] = field(default_factory=list)
    #: cases an earlier step (``voco convert``) could not produce: ``[{"case", "reason"}]`` (key ``voco_rejected``),
    #: carried into the manifest as rejected rows so that no case disappears without a verdict.
    rejected: list[dict[str, str]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.path.parent

    def shard(self, k: int, n: int) -> list[Entry]:
        """Entries of shard ``k`` of ``n``: entry ``i`` (stable dataset.json order) goes to shard ``i % n``."""
        if n < 1 or not 0 <= k < n:
            raise DataError(f"shard {k} of {n}: need 0 <= shard < num_shards and num_shards >= 1")
        return [e for e in self.entries if e.index % n == k]


def case_id_from_path(path: str | os.PathLike[str]) -> str:
    """``imagesTr/liver_003_0000.nii.gz`` -> ``liver_003`` (file-name stem, channel suffix dropped, safe characters)."""
    name = _NIFTI_SUFFIX.sub("", Path(path).name)
    name = _CHANNEL_SUFFIX.sub("", name)
    return _ID_CLEAN.sub("_", name) or "case"


def _int_keyed(obj: object, key: str, path: Path) -> dict[int, str]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise DataError(f"{path}: key {key!r} must be a mapping value -> name, got {type(obj).__name__}")
    out: dict[int, str] = {}
    for k, v in obj.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise DataError(f"{path}: key {key!r}: {k!r} is not an integer value") from None
    return out


def _resolve(root: Path, p: object, path: Path, where: str) -> Path:
    if not isinstance(p, str) or not p:
        raise DataError(f"{path}: {where}: expected a file path, got {p!r}")
    q = Path(p)
    return q if q.is_absolute() else (root / q)


def read_dataset_json(path: str | os.PathLike[str]) -> DatasetInfo:
    """Parse an MSD-style dataset.json.

    Raises:
        DataError: the file is missing, not JSON, or its structure is wrong (names the file and the key).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise DataError(f"{path}: dataset.json not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise DataError(f"{path}: top level must be an object")
    root = path.parent
    info = DatasetInfo(
        path=path,
        name=str(doc.get("name", root.name)),
        labels=_int_keyed(doc.get("labels"), "labels", path),
        labels_full=_int_keyed(doc.get("labels_full"), "labels_full", path),
        modality=_int_keyed(doc.get("modality"), "modality", path),
        region=doc.get("region"),
        voco_dataset=doc.get("voco_dataset"),
    )
    raw: list[tuple[str, object]] = [("train", e) for e in doc.get("training", []) or []]
    raw += [("test", e) for e in doc.get("test", []) or []]
    seen: dict[str, int] = {}
    for i, (split, e) in enumerate(raw):
        where = f"entry {i} ({'training' if split == 'train' else 'test'})"
        if isinstance(e, str):
            e = {"image": e}
        if not isinstance(e, dict) or "image" not in e:
            raise DataError(f"{path}: {where}: expected a path or an object with 'image', got {e!r}")
        img = e["image"]
        images = tuple(_resolve(root, p, path, where) for p in (img if isinstance(img, list) else [img]))
        if not images:
            raise DataError(f"{path}: {where}: empty image list")
        label = _resolve(root, e["label"], path, where) if e.get("label") else None
        label_full = _resolve(root, e["label_full"], path, where) if e.get("label_full") else None
        cls = e.get("class", -1)
        if not isinstance(cls, int) or isinstance(cls, bool):
            raise DataError(f"{path}: {where}: 'class' must be an integer, got {cls!r}")
        given = "case_id" in e and e["case_id"] not in (None, "")
        cid = e["case_id"] if given else case_id_from_path(images[0])
        if isinstance(cid, int) and not isinstance(cid, bool):
            cid = str(cid)
        problem = None
        if not isinstance(cid, str):
            problem = f"{path}: {where}: case_id {cid!r} must be a string"
            cid = repr(cid)
        # The same file name in training and test (MSD allows it): keep ids unique and stable.
        if cid in seen:
            base, n = cid, 2
            while f"{base}_{n}" in seen:
                n += 1
            cid = f"{base}_{n}"
        seen[cid] = i
        try:
            check_id(cid, f"{path}: {where}: case id" + ("" if given else f" (from the file name {images[0].name!r})"))
        except UnsafePathError as err:
            problem = problem or str(err)
        info.entries.append(Entry(i, cid, images, label, label_full, split, cls, problem))
    for j, r in enumerate(doc.get("voco_rejected") or []):
        if not isinstance(r, dict) or "case" not in r:
            raise DataError(f"{path}: voco_rejected[{j}]: expected an object with 'case' and 'reason', got {r!r}")
        info.rejected.append({"case": str(r["case"]), "reason": str(r.get("reason", ""))})
    if not info.entries:
        raise DataError(f"{path}: lists no cases (empty 'training' and 'test')")
    return info
