"""``voco predict``: segment new scans (NIfTI files, DICOM series) with a fine-tuned run, masks in their own geometry.

Example::

    voco predict -i scans/ -o masks/ --run runs/finetune/phantom_organs/stage2/plain/nall-s0
    voco predict -i patient_042/ -o patient_042_mask.nii.gz --run RUN      # one DICOM series -> one mask

Exit status: 0 when every scan was segmented (``--strict``) or at least one was (default); failed scans are listed in
``OUT/predict.json`` and the log; 2 when none could be.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from voco.config import add_config_arguments, config_from_args

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, type=Path,
                        help="a NIfTI file, a folder of NIfTI files, a DICOM series folder or a folder of series")
    parser.add_argument("-o", "--out", required=True, type=Path,
                        help="output folder (<scan>.nii.gz + predict.json), or a .nii.gz path for a single scan")
    parser.add_argument("--run", required=True, type=Path, help="fine-tuning run folder (run.json + model.pt)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap (default: evaluate.overlap of the config, as evaluation used)")
    parser.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible) | cpu | cuda | cuda:N")
    parser.add_argument("--no-amp", action="store_true", help="full precision on CUDA (default: bf16 / fp16 autocast)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any scan failed")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from voco.eval.predict import predict, summarise

    cfg = config_from_args(args)
    ecfg = cfg.get("evaluate", {})
    overlap = args.overlap if args.overlap is not None else ecfg.get("overlap")
    report = predict(args.run, args.input, args.out, overlap=overlap,
                     sw_batch_size=args.sw_batch_size or ecfg.get("sw_batch_size"), blend=ecfg.get("blend"),
                     device=args.device, amp=False if args.no_amp else None)  # None: autocast on CUDA only
    failed = summarise(report)
    log.info("predict: %d scan(s) segmented, %d failed -> %s (%.1f s)", report["n_ok"], report["n_failed"], args.out,
             report["seconds"])
    for line in failed:
        log.warning("failed: %s", line)
    return 1 if (args.strict and failed) else 0
