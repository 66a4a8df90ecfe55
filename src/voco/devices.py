"""Which torch device a command runs on (``--device auto|cpu|cuda``); shared by training, evaluation and
pseudo-labelling without importing the training code."""

from __future__ import annotations

import os

import torch

DEVICES = ("auto", "cpu", "cuda")


def select_device(name: str | None = "auto") -> torch.device:
    """``--device`` value -> torch device: ``auto`` = ``cuda:LOCAL_RANK`` when a GPU is visible, else CPU; ``cuda``
    without a visible GPU is an error (a GPU job that lost its GPU should fail, not crawl on CPU)."""
    from voco.errors import ConfigError

    name = (name or "auto").lower()
    if name not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
    if name == "cuda":
        raise ConfigError("--device cuda, but no CUDA GPU is visible to this job "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use --device auto|cpu")
    return torch.device("cpu")
