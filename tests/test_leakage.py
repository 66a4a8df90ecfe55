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
    assert rep["by_dataset"]["X"] == {"checked": 3, "overlapping": 2, "pretrain_datasets": ["A"],
                                      "splits": {"test": 3}}
    assert rep["notes"] == ["X: no dataset card given: audited its test split only (not a validation carve-out)"]
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


# ------------------------------------------------------------------ every split evaluation uses; the DAG gate
def _store_manifest(path: Path, dataset: str, sources: dict[str, Path], split: str = "train") -> Path:
    """A store-compatible manifest (what voco preprocess writes) of labelled cases with the given source files."""
    from voco.data.store import write_manifest

    rows = [{"case_id": cid, "dataset": dataset, "region": "abdomen", "status": "ok", "reason": "", "split": split,
             "labelled": True, "class": -1, "image": f"cases/{cid}/image.npy", "label": f"cases/{cid}/label.npy",
             "label_full": "", "meta": f"cases/{cid}/meta.json", "key": cid, "index": i, "source": str(src)}
            for i, (cid, src) in enumerate(sources.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, path)
    return path


def test_audit_checks_the_validation_carve_out_that_evaluation_scores(tmp_path):
    """BTCV-like: no labelled test split, so evaluation scores a validation part of training
    (voco.train.finetune.split_cases). A copy of a validation case in the corpus is found; a copy of a case that is
    only trained on is not an evaluation leak."""
    from voco.data.store import Store
    from voco.train.finetune import split_cases

    raw = tmp_path / "raw"
    xs = {f"x{i}": _save(_vol(100 + i), raw / "X" / f"x{i}.nii.gz") for i in range(10)}
    down = _store_manifest(tmp_path / "prep" / "X" / "manifest.parquet", "X", xs)
    card = {"id": "X", "task": "segmentation", "split": {"val_fraction": 0.2, "seed": 3}}
    splits = split_cases(Store(down.parent), card)
    assert splits.test == [] and len(splits.val) == 2
    val0, train0 = splits.val[0], splits.train[0]
    a = raw / "A"
    a.mkdir(parents=True)
    (a / "copy_of_val.nii.gz").write_bytes(xs[val0].read_bytes())
    (a / "copy_of_train.nii.gz").write_bytes(xs[train0].read_bytes())
    pre = _manifest(tmp_path / "prep" / "A" / "manifest.parquet", [
        {"case_id": "a_val", "dataset": "A", "split": "train", "source": str(a / "copy_of_val.nii.gz")},
        {"case_id": "a_train", "dataset": "A", "split": "train", "source": str(a / "copy_of_train.nii.gz")}])
    rep = audit([pre], [down], cards={"X": card})
    assert [(o["downstream_case"], o["split"], o["pretrain_case"]) for o in rep["overlaps"]] == [(val0, "val", "a_val")]
    assert rep["by_dataset"]["X"]["splits"] == {"val": 2} and rep["notes"] == []
    # the test split alone (what the audit used to check) sees nothing here
    assert audit([pre], [down], splits=["test"])["overlaps"] == []


def test_index_per_dataset_audit_merge_and_enforce(corpus, tmp_path, caplog):
    import logging

    pre, down = corpus
    idx = tmp_path / "leak" / "pretrain_index.parquet"
    assert voco_main(["audit-leakage", "--pretrain", str(pre), "--index-out", str(idx)]) == 0
    assert len(pd.read_parquet(idx)) == 3
    x = tmp_path / "leak" / "X.json"
    with caplog.at_level(logging.WARNING):
        rc = voco_main(["audit-leakage", "--index", str(idx), "--downstream", str(down), "--out", str(x),
                        "--fail-on-overlap"])
    assert rc == 1  # audit.enforce: the overlap fails the job ...
    assert "X/x0 (test) = A/a0 by file + voxels" in caplog.text  # ... and the log names every overlapping case
    one = json.loads(x.read_text())
    assert one == audit([pre], [down]) | {"pretrain_manifests": [str(pre)]}  # the index gives the same answer
    rep = tmp_path / "leak" / "report.json"
    assert voco_main(["audit-leakage", "--merge", str(x), "--out", str(rep)]) == 0
    merged = json.loads(rep.read_text())
    assert merged["n_overlapping_cases"] == 2 and merged["by_dataset"] == one["by_dataset"]
    assert "| X | 3 | 2 | A |" in rep.with_suffix(".md").read_text()


REPO = Path(__file__).resolve().parents[1]


def _smk(*args, timeout=900):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_enforced_audit_gates_fine_tuning_from_pretrained_inits_only(tmp_path):
    import yaml

    base = {"finetune": {"inits": ["scratch", "ssl"], "methods": ["plain"], "seeds": [0]}}
    for enforce in (True, False):
        ov = tmp_path / f"e{enforce}.yaml"
        ov.write_text(yaml.safe_dump({**base, "audit": {"enforce": enforce}}))
        wd = tmp_path / f"wd{enforce}"
        wd.mkdir()
        r = _smk("-n", "--directory", str(wd), "--configfile", str(REPO / "config/config.yaml"), str(ov),
                 "--printshellcmds", "--", "results/report/report.md")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        ssl_jobs = [b for b in out.split("\n\n") if "rule finetune:" in b and "/ssl/" in b]
        scratch_jobs = [b for b in out.split("\n\n") if "rule finetune:" in b and "/scratch/" in b]
        assert ssl_jobs and scratch_jobs
        gated = [("results/leakage/" in b) for b in ssl_jobs]
        assert all(gated) if enforce else not any(gated), (enforce, ssl_jobs[0])
        assert not any("results/leakage/" in b for b in scratch_jobs)
        assert ("--fail-on-overlap" in out) == enforce
        assert "rule leakage_index:" in out and "rule audit_leakage_dataset:" in out


@pytest.mark.slow
def test_an_overlap_fails_the_dag_before_any_pretraining_or_fine_tuning(tmp_path):
    """The same phantom dataset as pre-training corpus and downstream task: every evaluation case leaks. With the
    shipped default (audit.enforce true) the DAG stops at the audit, before pre-training and fine-tuning start."""
    import yaml

    ov = tmp_path / "leaky.yaml"
    ov.write_text(yaml.safe_dump({"datasets": {"pretrain": ["phantom_organs"], "downstream": ["phantom_organs"]},
                                  "finetune": {"inits": ["ssl"], "methods": ["plain"], "seeds": [0]}}))
    wd = tmp_path / "wd"
    wd.mkdir()
    r = _smk("--cores", "1", "--directory", str(wd), "--configfile", str(REPO / "config/config.yaml"), str(ov),
             "--", "results/phantom_organs/report/report.md")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "Error in rule audit_leakage_dataset" in out, out[-3000:]
    log = (wd / "logs" / "audit_leakage" / "phantom_organs.log").read_text()
    assert "audit.enforce is on: 4 evaluation case(s) overlap" in log
    assert not (wd / "runs").exists()  # no pre-training, no fine-tuning ever started
    assert not (wd / "results" / "leakage" / "phantom_organs.json").exists()
