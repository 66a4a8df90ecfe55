"""Sliding-window inference over whole preprocessed volumes (MONAI ``sliding_window_inference``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn


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
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Softmax probabilities of a whole volume by sliding-window inference.

    Args:
        model: maps (N, C, *roi) to logits (N, K, *roi); put in eval mode here.
        image: (X, Y, Z) or (C, X, Y, Z) float volume (volumes smaller than ``roi`` are padded by MONAI).
        roi: window size in voxels.
        overlap: fraction of window overlap (SPEC 6: 0.75).
        mode: window blending ("gaussian" or "constant").
        device: where the windows run (the blended output stays on the CPU, so whole CT volumes fit).
        amp: autocast the network to bf16 (fp16 where bf16 is not supported) on CUDA; ignored on the CPU.
        progress: a progress bar over the windows (MONAI's tqdm bar).

    Returns:
        (K, X, Y, Z) float32 probabilities on the CPU.
    """
    model.eval()
    device = torch.device(device)
    x = _as_batch(image, "cpu")
    dtype = None
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    ctx = torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
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
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Argmax label map (X, Y, Z) uint8 of :func:`predict_probs`."""
    probs = predict_probs(model, image, roi, overlap, sw_batch_size, mode, device)
    return probs.argmax(0).numpy().astype(np.uint8)


@torch.no_grad()
def predict_class(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    roi: Sequence[int],
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Class probabilities (K,) of one volume for a classifier: the volume is centre-cropped / padded to ``roi``.

    The classifier sees one ROI-sized view (the same view it was trained on: the centre of the foreground crop).
    """
    model.eval()
    x = _as_batch(center_crop_or_pad(np.asarray(image, dtype=np.float32), roi), device)
    return torch.softmax(model(x).float(), dim=1)[0].cpu().numpy()


def center_crop_or_pad(image: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Centre crop / zero pad the last three axes of ``image`` to ``roi``."""
    out = image
    lead = image.ndim - 3
    for ax, r in enumerate(roi):
        axis = lead + ax
        n = out.shape[axis]
        if n > r:
            start = (n - r) // 2
            out = np.take(out, range(start, start + r), axis=axis)
        elif n < r:
            pad = [(0, 0)] * out.ndim
            before = (r - n) // 2
            pad[axis] = (before, r - n - before)
            out = np.pad(out, pad)
    return out
