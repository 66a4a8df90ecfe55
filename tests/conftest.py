"""Shared test fixtures.

* Torch uses one thread per test process (2-core CI machines, many tests).
* ``totalseg_ref``: the real CT / DICOM fixtures shipped in the TotalSegmentator 2.18.0 source archive
  (``tests/reference_files/``), fetched once with ``pip download`` (PyPI is reachable in CI) and extracted into the
  git-ignored cache ``tests/.cache/``. Nothing from the archive is committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "tests" / ".cache"
TOTALSEG_VERSION = "2.18.0"

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("VOCO_ROOT", str(REPO))
os.environ.setdefault("MPLBACKEND", "Agg")

try:  # torch is heavy: only configure it if a test run imports it anyway
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def _extract_reference_files(sdist: Path, dest: Path) -> None:
    """Extract only ``*/tests/reference_files/*`` from the sdist, refusing unsafe member names."""
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if "reference_files" not in parts or not (m.isfile() or m.isdir()):
                continue
            rel = Path(*parts[parts.index("reference_files") + 1 :])
            if not rel.parts or rel.is_absolute() or ".." in rel.parts:
                continue
            target = tmp / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as out:
                out.write(src.read())
    tmp.rename(dest)


def fetch_totalseg_reference(cache: Path = CACHE) -> Path:
    dest = cache / f"totalsegmentator-{TOTALSEG_VERSION}" / "reference_files"
    if dest.is_dir():
        return dest
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    sdists = sorted(dl.glob(f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz"))
    if not sdists:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"totalsegmentator=={TOTALSEG_VERSION}", "-d", str(dl)]
        subprocess.run(cmd, check=True, timeout=600)
        sdists = sorted(dl.glob(f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz"))
    if not sdists:
        raise RuntimeError(f"pip download of totalsegmentator=={TOTALSEG_VERSION} gave no sdist in {dl}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _extract_reference_files(sdists[0], dest)
    return dest


@pytest.fixture(scope="session")
def totalseg_ref() -> Path:
    """Folder with TotalSegmentator 2.18.0's real reference CT / DICOM files (cached, never committed)."""
    try:
        return fetch_totalseg_reference()
    except (subprocess.SubprocessError, OSError, RuntimeError) as e:  # no PyPI: say so instead of a vague failure
        if os.environ.get("CI"):
            raise
        pytest.skip(f"TotalSegmentator reference files unavailable (pip download failed: {e})")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# TotalSegmentator v2 class ids -> our smoke-task classes
TS_CLASSES = {1: (1, "spleen"), 2: (2, "kidney_right"), 3: (3, "kidney_left"), 5: (4, "liver")}


def _write_case(ref: Path, out: Path, name: str, flip: bool) -> tuple[str, str]:
    import nibabel as nib
    import numpy as np

    ct = nib.load(ref / "example_ct_sm.nii.gz")
    seg = nib.load(ref / "example_seg.nii.gz")
    img = np.asanyarray(ct.dataobj).astype(np.int16)
    src = np.asanyarray(seg.dataobj)
    lab = np.zeros(src.shape, dtype=np.uint8)
    for ts, (ours, _) in TS_CLASSES.items():
        lab[src == ts] = ours
    if flip:  # a second, different-looking case: mirrored along the first voxel axis (same geometry)
        img, lab = img[::-1].copy(), lab[::-1].copy()
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, ct.affine), out / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(lab, ct.affine), out / "labelsTr" / f"{name}.nii.gz")
    return f"imagesTr/{name}.nii.gz", f"labelsTr/{name}.nii.gz"


@pytest.fixture(scope="session")
def totalseg_run(totalseg_ref, tmp_path_factory):
    """A 3-case real-CT task (2 train, 1 test), pre-processed, fine-tuned 60 steps from scratch and evaluated (with the
    original-geometry predictions saved); shared by the evaluation, prediction and export tests."""
    import json

    from voco.cli import main as voco

    root = tmp_path_factory.mktemp("totalseg_task")
    nifti = root / "nifti"
    entries = [_write_case(totalseg_ref, nifti, n, f) for n, f in [("ts_a", False), ("ts_b", True), ("ts_c", False)]]
    labels = {"0": "background", **{str(o): n for o, n in TS_CLASSES.values()}}
    doc = {
        "name": "totalseg_smoke", "labels": labels, "modality": {"0": "CT"}, "region": "abdomen",
        "training": [{"image": i, "label": lab} for i, lab in entries[:2]],
        "test": [{"image": entries[2][0], "label": entries[2][1]}],
    }
    (nifti / "dataset.json").write_text(json.dumps(doc))
    prep, run, res = root / "prep", root / "run", root / "res"
    assert voco(["preprocess", "--dataset-json", str(nifti / "dataset.json"), "--out", str(prep),
                 "--dataset", "totalseg_smoke", "--region", "abdomen"]) == 0
    assert voco(["finetune", "--dataset", "totalseg_smoke", "--init", "scratch", "--prep", str(prep),
                 "--out", str(run), "--steps", "60", "--seed", "0"]) == 0
    assert voco(["evaluate", "--dataset", "totalseg_smoke", "--run", str(run), "--prep", str(prep),
                 "--out", str(res), "--save-predictions"]) == 0
    return {"root": root, "nifti": nifti, "prep": prep, "run": run, "res": res, "ref": totalseg_ref}
