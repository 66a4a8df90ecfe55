"""DICOM series -> NIfTI (voco.data.dicom) on the real TotalSegmentator series and on edited copies of it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from voco.data import dicom, phantom
from voco.errors import DicomError


@pytest.fixture(scope="session")
def real_series(totalseg_ref: Path) -> Path:
    folder = totalseg_ref / "example_ct_dicom"
    assert folder.is_dir(), f"expected the DICOM series at {folder}"
    return folder


@pytest.fixture
def series_copy(real_series: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "series"
    shutil.copytree(real_series, dst)
    return dst


def _sorted_files(folder: Path) -> list[Path]:
    """Files sorted by position along the normal (axial series: z)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


def test_real_series_matches_the_shipped_nifti_geometry(real_series, totalseg_ref):
    vol = dicom.read_series(real_series)
    ref = nib.load(totalseg_ref / "example_seg_dicom.nii.gz")
    assert vol.array.shape == ref.shape == (512, 512, 20)
    assert np.allclose(vol.affine, ref.affine)
    assert nib.aff2axcodes(vol.affine) == ("L", "A", "S")
    assert vol.meta["n_slices"] == 20 and vol.meta["spacing"][2] == pytest.approx(2.0)
    # HU after rescale (JPEG-2000 pixels decoded), and the voxels line up with the shipped labels
    assert vol.array.min() >= -1024 and vol.array.max() > 1000
    seg = np.asarray(ref.dataobj)
    assert (vol.array[seg > 0] > -500).mean() > 0.95
    bones = np.isin(seg, np.arange(92, 117))  # TotalSegmentator v2 rib labels
    assert bones.sum() > 1000
    assert vol.array[bones].mean() > 200 > vol.array[:, :, ::-1][bones].mean()
    assert (vol.array[:, ::-1][seg > 0] > -500).mean() < 0.9  # a flipped row order would not line up


def test_missing_slice_is_reported_with_its_position(series_copy):
    files = _sorted_files(series_copy)
    gone = files[7]
    z = float(pydicom.dcmread(gone, stop_before_pixels=True).ImagePositionPatient[2])
    gone.unlink()
    with pytest.raises(DicomError, match="missing slice") as e:
        dicom.read_series(series_copy)
    assert str(series_copy) in str(e.value) and f"{z:g}" in str(e.value)


def test_inconsistent_spacing_and_orientation_and_duplicates(series_copy, tmp_path):
    files = _sorted_files(series_copy)
    pos = [float(v) for v in pydicom.dcmread(files[5]).ImagePositionPatient]
    _edit(files[5], ImagePositionPatient=[pos[0], pos[1], pos[2] + 0.7])
    with pytest.raises(DicomError, match="inconsistent slice spacing"):
        dicom.read_series(series_copy)
    _edit(files[5], ImagePositionPatient=pos, ImageOrientationPatient=[1, 0, 0, 0, 0.8, -0.6])
    with pytest.raises(DicomError, match="inconsistent orientation"):
        dicom.read_series(series_copy)
    _edit(files[5], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    dup = tmp_path / "series" / "duplicate"
    shutil.copy(files[5], dup)
    with pytest.raises(DicomError, match="duplicate slice position"):
        dicom.read_series(series_copy)


@pytest.mark.slow
def test_mixed_series_picks_the_largest_or_refuses_a_tie(series_copy, tmp_path, caplog):
    # a second series of the same size: same files with another SeriesInstanceUID
    other = tmp_path / "other"
    shutil.copytree(series_copy, other)
    for p in other.iterdir():
        _edit(p, SeriesInstanceUID="1.2.3.4.5.6.7.8.9")
        p.rename(series_copy / f"B{p.name}")
    with pytest.raises(DicomError, match="mixed series of equal size"):
        dicom.read_series(series_copy)
    assert dicom.read_series(series_copy, series_uid="1.2.3.4.5.6.7.8.9").array.shape == (512, 512, 20)
    # remove three of the second series: the original (20 files) is now the largest
    for p in sorted(series_copy.glob("B*"))[:3]:
        p.unlink()
    with caplog.at_level(logging.WARNING, logger="voco.data.dicom"):
        vol = dicom.read_series(series_copy)
    assert vol.array.shape == (512, 512, 20) and vol.meta["series_uid"] != "1.2.3.4.5.6.7.8.9"
    assert "mixed series" in caplog.text


def test_empty_or_non_dicom_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "junk").write_bytes(b"\x00" * 300)
    with pytest.raises(DicomError, match="no DICOM image slices"):
        dicom.read_series(tmp_path)


def test_phantom_series_round_trip_keeps_hu_and_world_geometry(tmp_path):
    s = phantom.PhantomSettings(spacing_scale=6.0)
    case = phantom.generate_case(s, phantom.case_rng(0, 9, 0))
    geo = dicom.write_series(case.image, case.affine, tmp_path / "case0", case_id="case0")
    files = sorted((tmp_path / "case0").iterdir())
    assert len(files) == case.image.shape[2] and all(f.suffix == "" for f in files)
    (tmp_path / "case0" / "README.txt").write_text("not dicom")  # ignored
    shutil.copy(files[0], tmp_path / "case0" / "copy.dcm")  # .dcm suffix is fine ... but a duplicate position
    with pytest.raises(DicomError, match="duplicate"):
        dicom.read_series(tmp_path / "case0")
    (tmp_path / "case0" / "copy.dcm").unlink()
    vol = dicom.read_series(tmp_path / "case0")
    expected, exp_aff = dicom.reorient(case.image, case.affine, "LAS")
    assert vol.array.dtype == np.int16 and np.array_equal(vol.array, expected)
    assert np.allclose(vol.affine, exp_aff, atol=1e-3) and np.array_equal(
        vol.affine, geo.to_volume(np.zeros((case.image.shape[2], case.image.shape[1], case.image.shape[0])))[1]
    )
    native = dicom.read_series(tmp_path / "case0", orientation=None)
    assert np.array_equal(native.array, case.image) and np.allclose(native.affine, case.affine, atol=1e-3)
    hdr = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert hdr.Modality == "CT" and float(hdr.RescaleIntercept) == -1024 and len(hdr.PixelSpacing) == 2


@pytest.mark.parametrize("tag", ["PixelSpacing", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient"])
def test_a_slice_missing_a_geometry_tag_is_a_dicom_error_naming_slice_and_tag(tmp_path, tag):
    """Issue 14: a slice without PixelSpacing or Rows raised AttributeError (and stopped all of convert)."""
    vol = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    dicom.write_series(vol, np.diag([0.7, 0.7, 2.0, 1.0]), tmp_path / "s", case_id="s")
    victim = sorted((tmp_path / "s").iterdir())[1]
    ds = pydicom.dcmread(victim)
    delattr(ds, tag)
    ds.save_as(victim)
    if tag in ("ImagePositionPatient", "ImageOrientationPatient"):  # such a file is not an image slice: skipped,
        with pytest.raises(DicomError, match="1 missing slice"):  # ... which leaves a gap in the stack, named
            dicom.read_series(tmp_path / "s")
        return
    with pytest.raises(DicomError, match=f"{victim.name}: slice has no {tag}"):
        dicom.read_series(tmp_path / "s")
