"""A finished fine-tuning run, as evaluation, prediction and export see it.

A run folder holds ``run.json`` (ids, classes, ROI, provenance) and ``model.pt`` (a self-describing model file,
:mod:`voco.models.record`). Loading one belongs to neither training nor evaluation: ``voco evaluate``, ``voco predict``
and ``voco export`` all start from :func:`load_run`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voco.errors import CheckpointError


@dataclass
class Run:
    """A loaded run.

    Attributes:
        path: the run folder.
        record: ``run.json``.
        net: the trained network (eval mode, CPU).
        meta: the model file's description (architecture, labels, preprocess, inference).
    """

    path: Path
    record: dict[str, Any]
    net: nn.Module
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.record.get("task", "segmentation"))

    @property
    def roi(self) -> list[int]:
        return [int(r) for r in self.record["roi"]]

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in (self.record.get("labels") or self.meta.get("labels") or {}).items()}

    @property
    def preprocess(self) -> dict[str, Any]:
        """The pre-processing the model's inputs went through (``run.json``, else the model file's META)."""
        return dict(self.record.get("preprocess") or self.meta.get("preprocess") or {})


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """``run.json`` and the trained network of a fine-tuning run folder.

    Raises:
        CheckpointError: the folder is not a finished run, or ``model.pt`` is unreadable / does not fit its record.
    """
    from voco.io import read_json
    from voco.models.classifier import build_network
    from voco.models.record import read_model

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "model.pt").is_file():
        raise CheckpointError(f"{run_dir}: not a finished fine-tuning run (run.json / model.pt missing); "
                              "run voco finetune first")
    record = read_json(run_dir / "run.json")
    state, meta = read_model(run_dir / "model.pt")
    arch = record.get("arch") or {}
    net = build_network(arch)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{run_dir / 'model.pt'}: weights do not fit the run's architecture {arch} ({e})") from e
    net.eval()
    return Run(run_dir, record, net, meta)


def case_class(store: Any, case_id: str) -> int:
    """The manifest's ``class`` of a case (-1 when missing)."""
    v = store.row(case_id).get("class")
    try:
        return -1 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)
    except (TypeError, ValueError):
        return -1


def resize_volume(image: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """(X, Y, Z) or (C, X, Y, Z) -> (C, *size) float32 by trilinear resizing (the classifier's whole-volume view)."""
    t = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if t.ndim == 3:
        t = t[None]
    return F.interpolate(t[None], size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0]
