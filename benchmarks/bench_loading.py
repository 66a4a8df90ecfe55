"""Crops per second: our pre-processed store vs MONAI ``LoadImaged`` on the original ``.nii.gz`` + the same transforms.

Same cases (synthetic phantom CT written as NIfTI in a temp folder, LPS voxel order, anisotropic spacing), same crop
size, one run, one thread. The store side is measured after ``voco preprocess`` has run once (its time is printed
too); the MONAI side loads and transforms the original file for every crop (orientation RAS, spacing, HU window,
foreground crop, pad, random crop), as a training loop without a cache does. A second MONAI line amortises one load
over several crops (``RandSpatialCropSamplesd``), the fairest reading of a loop that takes many crops per volume.

It also measures the store format choice: random crops from ``.npy`` float16 memory maps (ours) vs ``.npy`` float32
memory maps, compressed ``.npz`` and ``.nii.gz`` of the same pre-processed volume.

Usage: ``python benchmarks/bench_loading.py [--cases 3] [--roi 96] [--seconds 6] [--json out.json]`` (< 2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SPACING = (1.5, 1.5, 1.5)
WINDOW = (-175.0, 250.0)


def make_cases(folder: Path, n: int, scale: float) -> Path:
    """Write ``n`` phantom CT volumes (+ labels) and a dataset.json; fall back to ellipsoid blobs without phantom."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    entries = []
    for i in range(n):
        try:
            from voco.data.phantom import PhantomSettings, case_rng, generate_case

            c = generate_case(PhantomSettings(spacing_scale=scale), case_rng(0, 99, i))
            image, label, affine = c.image, c.label, c.affine
        except ImportError:  # pragma: no cover - before the phantom generator existed
            rng = np.random.default_rng(i)
            shape = (256, 200, 60)
            g = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
            r = ((g[0] - 128) / 110) ** 2 + ((g[1] - 100) / 80) ** 2
            image = np.where(r < 1, 40, -1000).astype(np.int16) + rng.normal(0, 20, shape).astype(np.int16)
            label = (r < 0.2).astype(np.uint8)
            affine = np.diag([-0.8, -0.8, 5.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / f"case{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"case{i:03d}.nii.gz")
        entries.append({"image": f"imagesTr/case{i:03d}.nii.gz", "label": f"labelsTr/case{i:03d}.nii.gz"})
    doc = {"name": "bench", "region": "abdomen", "modality": {"0": "CT"}, "labels": {}, "training": entries}
    (folder / "dataset.json").write_text(json.dumps(doc))
    return folder / "dataset.json"


def build_store(dataset_json: Path, out: Path, roi: int) -> float:
    from voco.data.catalog import read_dataset_json
    from voco.data.preprocess import Params, process_entry
    from voco.data.store import MANIFEST, write_manifest

    info = read_dataset_json(dataset_json)
    params = Params(spacing=SPACING, window=WINDOW, roi=(roi,) * 3)
    t0 = time.perf_counter()
    rows = [process_entry(e, out, params, "bench", "abdomen", {}, {}) for e in info.entries]
    write_manifest(rows, out / MANIFEST)
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"preprocess failed: {bad[0]['reason']}")
    return time.perf_counter() - t0


def timed(fn, seconds: float, min_iters: int = 1, max_iters: int = 100000) -> tuple[int, float]:
    """Call fn() repeatedly for about ``seconds`` (at least ``min_iters`` times); return (calls, elapsed)."""
    t0 = time.perf_counter()
    n = 0
    while n < max_iters and (n < min_iters or time.perf_counter() - t0 < seconds):
        fn()
        n += 1
    return n, time.perf_counter() - t0


def bench_store(prep: Path, roi: int, seconds: float) -> float:
    from voco.data.loading import CropDataset
    from voco.data.store import Store

    ds = CropDataset(Store(prep), (roi,) * 3, samples_per_case=100000, seed=1)
    it = iter(range(len(ds)))
    for _ in range(4):  # open each case once (page cache warm on both sides: MONAI's files are warm too)
        ds[next(it)]
    n, dt = timed(lambda: ds[next(it)]["image"].sum(), seconds, min_iters=20)
    return n / dt


def monai_pipeline(roi: int, samples: int):
    from monai import transforms as T

    crop = (
        T.RandSpatialCropd(keys=["image"], roi_size=(roi,) * 3, random_size=False)
        if samples == 1
        else T.RandSpatialCropSamplesd(keys=["image"], roi_size=(roi,) * 3, num_samples=samples, random_size=False)
    )
    return T.Compose(
        [
            T.LoadImaged(keys=["image"], image_only=True),
            T.EnsureChannelFirstd(keys=["image"]),
            T.Orientationd(keys=["image"], axcodes="RAS"),
            T.Spacingd(keys=["image"], pixdim=SPACING, mode="bilinear"),
            T.ScaleIntensityRanged(keys=["image"], a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
            T.CropForegroundd(keys=["image"], source_key="image", select_fn=lambda x: x > 0, allow_smaller=True),
            T.SpatialPadd(keys=["image"], spatial_size=(roi,) * 3),
            crop,
        ]
    )


def bench_monai(files: list[Path], roi: int, seconds: float, samples: int) -> float:
    pipe = monai_pipeline(roi, samples)
    pipe.set_random_state(seed=1)
    state = {"i": 0, "crops": 0}

    def one() -> None:
        out = pipe({"image": str(files[state["i"] % len(files)])})
        outs = out if isinstance(out, list) else [out]
        for o in outs:
            assert tuple(o["image"].shape[-3:]) == (roi,) * 3
            float(o["image"].sum())
        state["crops"] += len(outs)
        state["i"] += 1

    _, dt = timed(one, seconds, min_iters=len(files))
    return state["crops"] / dt


def bench_formats(prep: Path, roi: int, seconds: float) -> dict[str, float]:
    """Random crops per second from one pre-processed volume stored in several formats (open + crop each time)."""
    from voco.data.loading import crop_start
    from voco.data.store import Store

    store = Store(prep)
    case = store.load(store.ids()[0])
    vol = np.asarray(case.image, dtype=np.float32)
    d = prep / "formats"
    d.mkdir()
    np.save(d / "f16.npy", vol.astype(np.float16))
    np.save(d / "f32.npy", vol)
    np.savez_compressed(d / "f16.npz", image=vol.astype(np.float16))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), d / "f32.nii.gz")
    nib.save(nib.Nifti1Image(vol, np.eye(4)), d / "f32.nii")
    rng = np.random.default_rng(0)
    r = (roi,) * 3

    def crop(a):
        s = crop_start(a.shape, r, rng)
        return torch.from_numpy(np.array(a[s[0] : s[0] + roi, s[1] : s[1] + roi, s[2] : s[2] + roi])).float()

    readers = {
        "npy float16 mmap (ours)": lambda: crop(np.load(d / "f16.npy", mmap_mode="r")),
        "npy float32 mmap": lambda: crop(np.load(d / "f32.npy", mmap_mode="r")),
        "nii float32 (nibabel mmap)": lambda: crop(nib.load(d / "f32.nii").dataobj),
        "npz float16 compressed": lambda: crop(np.load(d / "f16.npz")["image"]),
        "nii.gz float32": lambda: crop(np.asanyarray(nib.load(d / "f32.nii.gz").dataobj)),
    }
    sizes = {
        k: p.stat().st_size
        for k, p in zip(readers, ["f16.npy", "f32.npy", "f32.nii", "f16.npz", "f32.nii.gz"], strict=True)
        for p in [d / p]
    }
    out = {}
    for name, fn in readers.items():
        n, dt = timed(fn, seconds, min_iters=3)
        out[name] = n / dt
        print(f"  {name:30s} {n / dt:9.1f} crops/s   {sizes[name] / 2**20:7.1f} MiB on disk")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--roi", type=int, default=96, help="crop side (voxels at 1.5 mm)")
    ap.add_argument("--scale", type=float, default=2.0, help="phantom spacing scale (2 = ~1.6 x 1.6 x 5.7 mm)")
    ap.add_argument("--seconds", type=float, default=6.0, help="time per measurement")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="voco-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        dj = make_cases(tmp / "nifti", args.cases, args.scale)
        files = sorted((tmp / "nifti" / "imagesTr").glob("*.nii.gz"))
        shape = nib.load(files[0]).shape
        zooms = tuple(round(float(z), 2) for z in nib.load(files[0]).header.get_zooms())
        print(
            f"cases: {len(files)} synthetic CT, e.g. {shape} at {zooms} mm -> {SPACING} mm; "
            f"crop {args.roi}^3; torch threads {torch.get_num_threads()} (made in {time.perf_counter() - t0:.1f} s)"
        )
        prep_s = build_store(dj, tmp / "prep", args.roi)
        print(f"voco preprocess (once): {prep_s:.1f} s for {len(files)} cases")
        ours = bench_store(tmp / "prep", args.roi, args.seconds)
        monai1 = bench_monai(files, args.roi, args.seconds, samples=1)
        monai4 = bench_monai(files, args.roi, args.seconds, samples=4)
        print(f"store (voco.data.loading.CropDataset):              {ours:9.1f} crops/s")
        print(f"MONAI LoadImaged .nii.gz + transforms, 1 crop/load: {monai1:9.2f} crops/s")
        print(f"MONAI LoadImaged .nii.gz + transforms, 4 crops/load:{monai4:9.2f} crops/s")
        print(f"RATIO store / MONAI (1 crop per load): {ours / monai1:.1f}x   (target >= 5x)")
        print(f"ratio store / MONAI (4 crops per load): {ours / monai4:.1f}x")
        print("store format (one pre-processed volume, open + random crop each time):")
        formats = bench_formats(tmp / "prep", args.roi, min(args.seconds, 3.0))
    figures = {
        "store_crops_per_s": ours,
        "monai_crops_per_s": monai1,
        "monai4_crops_per_s": monai4,
        "ratio": ours / monai1,
        "ratio_4": ours / monai4,
        "preprocess_s": prep_s,
        "formats": formats,
        "roi": args.roi,
        "cases": args.cases,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ours / monai1 >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
