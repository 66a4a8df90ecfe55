"""Leakage audit on real NIfTI files: byte copies and re-encoded copies of pre-training volumes are found."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from voco.cli import main as voco_main
from voco.data.leakage import audit, read_manifest, voxel_hash
from voco.errors import DataError


def _vol(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=(12, 10, 8)).astype(np.int16)


def _save(arr: np.ndarray, path: Path, affine: np.ndarray | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine)
    for k, v in kw.items():
        getattr(img.header, k)(*v) if isinstance(v, tuple) else None
    nib.save(img, str(path))
    return path


def _manifest(path: Path, rows: list[dict], source_col: str = "source") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(
        [
            {
                "case_id": r["case_id"],
                "dataset": r["dataset"],
                "status": r.get("status", "ok"),
                "split": r["split"],
                source_col: r["source"],
                "image": f"{r['case_id']}/image.npy",
            }
            for r in rows
        ]
    )
    df.to_parquet(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    """Pre-training dataset A (3 volumes) and downstream dataset X with copies of two of them in its test split."""
    raw = tmp_path / "raw"
    a = [_save(_vol(i), raw / "A" / f"a{i}.nii.gz") for i in range(3)]
    # X/test: x0 = byte copy of a0 under another name; x1 = a1 re-encoded: uncompressed .nii, float32 with scaling,
    # stored with the first axis flipped (affine adjusted, so the RAS voxels are the same); x2 = unrelated volume.
    x0 = raw / "X" / "x0.nii.gz"
    x0.parent.mkdir(parents=True)
    x0.write_bytes(a[1 - 1].read_bytes())
    flip = np.diag([-0.8, 0.8, 2.5, 1.0])
    flip[0, 3] = 0.8 * 11
    x1 = _save(_vol(1)[::-1].astype(np.float32), raw / "X" / "x1.nii", affine=flip)
    x2 = _save(_vol(99), raw / "X" / "x2.nii.gz")
    x3 = raw / "X" / "x3_train.nii.gz"  # a copy of a2, but in the training split: not an evaluation leak
    x3.write_bytes(a[2].read_bytes())
    pre = _manifest(
        tmp_path / "prep" / "A" / "manifest.parquet",
        [{"case_id": f"a{i}", "dataset": "A", "split": "train", "source": str(p)} for i, p in enumerate(a)],
    )
    # the downstream manifest stores paths relative to its folder, in column source_image
    down_dir = tmp_path / "prep" / "X"
    rows = [
        {"case_id": f"x{i}", "dataset": "X", "split": "test", "source": str(Path("../../raw/X") / p.name)}
        for i, p in enumerate([x0, x1, x2])
    ]
    rows.append({"case_id": "x3", "dataset": "X", "split": "train", "source": "../../raw/X/x3_train.nii.gz"})
    rows.append(
        {"case_id": "x4", "dataset": "X", "split": "test", "source": "../../raw/X/missing.nii.gz", "status": "rejected"}
    )
    down = _manifest(down_dir / "manifest.parquet", rows, source_col="source_image")
    return pre, down


def test_voxel_hash_ignores_encoding_but_not_content(tmp_path):
    v = _vol(3)
    h1 = voxel_hash(_save(v, tmp_path / "a.nii.gz"))
    assert voxel_hash(_save(v, tmp_path / "b.nii")) == h1
    assert voxel_hash(_save(v.astype(np.float32), tmp_path / "c.nii.gz")) == h1
    w = v.copy()
    w[0, 0, 0] += 1
    assert voxel_hash(_save(w, tmp_path / "d.nii.gz")) != h1
    assert voxel_hash(_save(v.reshape(10, 12, 8), tmp_path / "e.nii.gz")) != h1  # same bytes, other shape
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="bad.nii.gz"):
        voxel_hash(tmp_path / "bad.nii.gz")


def test_read_manifest_resolves_relative_sources(corpus):
    _, down = corpus
    refs = read_manifest(down, splits=["test"])
    assert [r.case_id for r in refs] == ["x0", "x1", "x2"]  # rejected x4 and training x3 left out
    assert all(Path(r.source).is_file() for r in refs)


def test_audit_finds_byte_and_reencoded_copies(corpus):
    pre, down = corpus
    rep = audit([pre], [down])
    found = {(o["downstream_case"], o["pretrain_case"]): o["match"] for o in rep["overlaps"]}
    assert found == {("x0", "a0"): ["file", "voxels"], ("x1", "a1"): ["voxels"]}
    assert rep["by_dataset"]["X"] == {"checked": 3, "overlapping": 2, "pretrain_datasets": ["A"]}
    assert rep["unreadable"] == []
    # the training split is audited on request
    rep = audit([pre], [down], splits=["test", "train"])
    assert ("x3", "a2") in {(o["downstream_case"], o["pretrain_case"]) for o in rep["overlaps"]}


def test_cli_reports_and_fail_flag(corpus, tmp_path):
    pre, down = corpus
    out = tmp_path / "results" / "leakage" / "report.json"
    assert voco_main(["audit-leakage", "--pretrain", str(pre), "--downstream", str(down), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n_overlapping_cases"] == 2
    md = out.with_suffix(".md").read_text()
    assert "| X | 3 | 2 | A |" in md and "| X | x1 | test | A | a1 | voxels |" in md
    rc = voco_main(
        ["audit-leakage", "--pretrain", str(pre), "--downstream", str(down), "--out", str(out), "--fail-on-overlap"]
    )
    assert rc == 1


def test_cli_clean_corpus_passes_fail_flag(corpus, tmp_path):
    pre, _ = corpus
    clean = _manifest(
        tmp_path / "prep" / "Y" / "manifest.parquet",
        [
            {
                "case_id": "y0",
                "dataset": "Y",
                "split": "test",
                "source": str(_save(_vol(42), tmp_path / "raw" / "Y" / "y0.nii.gz")),
            }
        ],
    )
    out = tmp_path / "r.json"
    assert (
        voco_main(
            [
                "audit-leakage",
                "--pretrain",
                str(pre),
                "--downstream",
                str(clean),
                "--out",
                str(out),
                "--fail-on-overlap",
            ]
        )
        == 0
    )
    assert "No overlap found." in out.with_suffix(".md").read_text()


def test_manifest_without_source_column(tmp_path):
    p = tmp_path / "m.parquet"
    pd.DataFrame([{"case_id": "a", "image": "a/image.npy"}]).to_parquet(p)
    with pytest.raises(DataError, match="source"):
        read_manifest(p)
