"""Sliding-window inference over whole preprocessed volumes (:mod:`voco.eval.sliding`: MONAI's
``sliding_window_inference`` in plain torch, so that ``voco evaluate`` / ``predict`` do not import MONAI).

Inference runs where the model is (its parameters' device, unless told otherwise), under autocast on CUDA (bf16 where
the GPU supports it, else fp16: the AMP the training loop uses); the probabilities come back as float32 on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from voco.eval.sliding import sliding_window_inference


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-less model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def autocast_for(device: torch.device | str, amp: bool | None = None) -> contextlib.AbstractContextManager:
    """Autocast for inference on ``device``: on CUDA by default (bf16 if supported, else fp16); never on CPU unless
    ``amp`` is True (then bf16, CPU autocast's type)."""
    device = torch.device(device)
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _as_batch(image: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(image, dtype=np.float32)) if not torch.is_tensor(image) else image.float()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected an image (X, Y, Z) or (C, X, Y, Z), got shape {tuple(t.shape)}")
    return t[None].to(device)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    roi: Sequence[int],
    overlap: float = 0.75,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    amp: bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Softmax probabilities of a whole volume by sliding-window inference.

    Args:
        model: maps (N, C, *roi) to logits (N, K, *roi); put in eval mode here.
        image: (X, Y, Z) or (C, X, Y, Z) float volume (an axis shorter than ``roi`` is zero-padded for the
            windows, as MONAI pads it, and cropped back).
        roi: window size in voxels.
        overlap: fraction of window overlap (SPEC 6: 0.75).
        mode: window blending ("gaussian" or "constant").
        device: where the windows run (default: the model's device; the model is not moved). The blended output stays
            on the CPU, so whole CT volumes fit.
        amp: autocast the network (default: on CUDA only, bf16 where supported else fp16; see :func:`autocast_for`).
        progress: progress over the window batches (:func:`voco.progressbar.track`: a bar on a terminal, log
            lines otherwise).

    Returns:
        (K, X, Y, Z) float32 probabilities on the CPU.
    """
    model.eval()
    device = torch.device(device) if device is not None else model_device(model)
    x = _as_batch(image, "cpu")
    with autocast_for(device, amp):
        logits = sliding_window_inference(
            x, roi_size=list(roi), sw_batch_size=sw_batch_size, predictor=model, overlap=overlap, mode=mode,
            sw_device=device, device="cpu", progress=progress,
        )
    return torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu()


def predict_labels(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    roi: Sequence[int],
    overlap: float = 0.75,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    amp: bool | None = None,
) -> np.ndarray:
    """Argmax label map (X, Y, Z) uint8 of :func:`predict_probs`."""
    probs = predict_probs(model, image, roi, overlap, sw_batch_size, mode, device, amp)
    return probs.argmax(0).numpy().astype(np.uint8)
