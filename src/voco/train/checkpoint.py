"""Atomic, weights-only training checkpoints and RNG state capture (exact resume).

A checkpoint is a dict with at least ``model``, ``optimizer``, ``scheduler``, ``ema`` (or None), ``scaler``, ``rng``
(one entry per rank), ``step``, ``data`` (epoch, batches consumed in it), ``stage``, ``method``, ``config``. Everything
in it is a tensor or a plain Python value, so ``torch.load(weights_only=True)`` reads it back.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voco.errors import CheckpointError
from voco.io import atomic_path

log = logging.getLogger(__name__)

LAST = "last.pt"
FINAL = "final.pt"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states as tensors / plain values (weights-only serialisable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    version, py_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in py_state), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((str(name), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(g)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has %d CUDA RNG states, %d devices visible: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then rename (a crash never leaves a torn checkpoint)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Weights-only load on CPU; a missing or unreadable file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a voco training checkpoint (needs 'model' and 'step')")
    return state


def find_resume(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from: ``final.pt`` if present, else ``last.pt``, else None."""
    run_dir = Path(run_dir)
    for name in (FINAL, LAST):
        if (run_dir / name).is_file():
            return run_dir / name
    return None
