"""Sliding-window inference in plain torch: MONAI's ``sliding_window_inference`` for the arguments voco uses.

No MONAI import (``voco evaluate`` / ``predict`` start in torch's time, not MONAI's). For a predictor that maps
(n, C, *roi) to (n, K, *roi), :func:`sliding_window_inference` returns what MONAI's function returns with the same
``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``, ``sigma_scale``, ``sw_device`` and ``device`` (padding mode
constant, value 0); ``tests/test_sliding_window.py`` checks it against MONAI. The steps, as MONAI takes them:

1. an axis shorter than the window is zero-padded to the window's size (``diff // 2`` voxels before, the rest after),
   and the padding is cropped off the result;
2. windows start every ``int(roi * (1 - overlap))`` voxels (at least 1; one window when the axis equals the window),
   the last one moved back to end at the volume's edge (:func:`window_starts`); the windows are taken in C order
   (the last axis fastest), ``sw_batch_size`` at a time, across the cases of the batch;
3. each window's output is multiplied by an importance map (:func:`importance_map`: ones, or a Gaussian with
   ``sigma = sigma_scale * roi`` per axis whose smallest values are clamped) on the windows' device, moved to the
   output device and added into the output; the output is divided by the summed map of all windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

MODES = ("constant", "gaussian")

#: importance-map values are clamped to at least max(min value, this) (MONAI's ``compute_importance_map``)
MIN_WEIGHT = 1e-3


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """Steps between window starts per axis: the window's size where it equals the image's, else
    ``int(roi * (1 - overlap))``, at least 1 (``image_size`` is already padded to at least the window)."""
    steps = []
    for n, r, o in zip(image_size, roi_size, overlap, strict=True):
        steps.append(int(r) if r == n else max(int(r * (1 - o)), 1))
    return tuple(steps)


def window_starts(n: int, roi: int, step: int) -> list[int]:
    """Window starts along one axis of ``n`` voxels (``n >= roi``): ``0, step, 2 step, ...`` up to the first window
    that reaches the end, that last one shifted back to end at ``n``."""
    count = 1
    while (count - 1) * step + roi < n:
        count += 1
    return [i * step - max(i * step + roi - n, 0) for i in range(count)]


def window_slices(image_size: Sequence[int], roi_size: Sequence[int],
                  steps: Sequence[int]) -> list[tuple[slice, ...]]:
    """Spatial slices of every window, in C order (the last axis varies fastest)."""
    per_axis = [window_starts(n, r, s) for n, r, s in zip(image_size, roi_size, steps, strict=True)]
    return [tuple(slice(s, s + r) for s, r in zip(starts, roi_size, strict=True))
            for starts in itertools.product(*per_axis)]


def importance_map(roi_size: Sequence[int], mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of each voxel of a window, shape ``roi_size``.

    ``constant``: ones. ``gaussian``: the product over axes of ``exp(-x^2 / (2 sigma^2))``, ``x`` the distance to the
    window's centre, ``sigma = sigma_scale * roi``; values below ``max(min, 1e-3)`` are raised to it (a zero weight
    would divide by zero where only edges cover a voxel). Computed in float32, returned as ``dtype``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "constant":
        weights = torch.ones(tuple(roi_size), device=device, dtype=torch.float32)
    else:
        scales = _per_axis(sigma_scale, len(roi_size), "sigma_scale")
        weights = None
        for axis, (n, scale) in enumerate(zip(roi_size, scales, strict=True)):
            sigma = n * scale
            x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0  # exact: half-integers
            g = torch.exp(-(x**2) / (2 * sigma**2))
            weights = g if weights is None else weights.unsqueeze(-1) * g[(None,) * axis]
    floor = max(torch.min(weights).item(), MIN_WEIGHT)
    return torch.clamp(weights, min=floor).to(dtype)


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * ndim
    value = tuple(value)
    if len(value) == 1:
        return value * ndim
    if len(value) != ndim:
        raise ValueError(f"{name} has {len(value)} values for {ndim} spatial axes")
    return value


def _track(batches: range, total: int):
    from voco.progressbar import track

    return track(batches, desc="sliding window", total=total, unit="batch")


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    overlap: float | Sequence[float] = 0.25,
    mode: str = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Blend ``predictor`` over overlapping windows of ``inputs`` (see the module docstring).

    Args:
        inputs: (N, C, *S) batch; its dtype is the output's and the weights' dtype.
        roi_size: window size per spatial axis (a non-positive or None entry: the whole axis).
        sw_batch_size: windows per predictor call.
        predictor: maps (n, C, *roi) to (n, K, *roi).
        overlap: fraction of overlap between neighbouring windows, per axis or one for all, in [0, 1).
        mode: ``constant`` (every voxel of a window weighs the same) or ``gaussian`` (the centre weighs more).
        sigma_scale: the Gaussian's sigma as a fraction of the window size (``gaussian`` only).
        sw_device: where windows are predicted (default: the inputs' device).
        device: where the blended output is kept (default: the inputs' device).
        progress: show progress over the predictor calls (:func:`voco.progressbar.track`).

    Returns:
        (N, K, *S) blended output on ``device``.
    """
    ndim = inputs.ndim - 2
    if ndim < 1:
        raise ValueError(f"inputs must be (N, C, *spatial), got shape {tuple(inputs.shape)}")
    if len(roi_size) != ndim:
        raise ValueError(f"roi_size {tuple(roi_size)} has {len(roi_size)} axes; inputs of shape "
                         f"{tuple(inputs.shape)} have {ndim} spatial axes")
    overlaps = _per_axis(overlap, ndim, "overlap")
    if any(o < 0 or o >= 1 for o in overlaps):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    dtype = inputs.dtype
    device = torch.device(device) if device is not None else inputs.device
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    batch, _, *shape = inputs.shape
    roi = tuple(int(r) if r is not None and r > 0 else n for r, n in zip(roi_size, shape, strict=True))

    # 1. pad axes shorter than the window (F.pad lists the last axis first)
    before = [max(r - n, 0) // 2 for r, n in zip(roi, shape, strict=True)]
    after = [max(r - n, 0) - b for r, n, b in zip(roi, shape, before, strict=True)]
    padded = any(before) or any(after)
    if padded:
        pad = [p for b, a in zip(reversed(before), reversed(after), strict=True) for p in (b, a)]
        inputs = F.pad(inputs, pad, mode="constant", value=0.0)
    image_size = tuple(max(n, r) for n, r in zip(shape, roi, strict=True))

    # 2. the windows; 3. their weights, the summed weights, the weighted sum of the outputs
    slices = window_slices(image_size, roi, scan_interval(image_size, roi, overlaps))
    n_win = len(slices)
    total = n_win * batch
    weights = importance_map(roi, mode, sigma_scale, device=sw_device, dtype=dtype)[None, None]
    weights_out = weights.to(device)
    count = torch.zeros((1, 1, *image_size), dtype=dtype, device=device)
    for s in slices:
        count[(slice(None), slice(None), *s)] += weights_out
    output: torch.Tensor | None = None

    starts = range(0, total, sw_batch_size)
    for first in _track(starts, len(starts)) if progress else starts:
        index = [(i // n_win, slices[i % n_win]) for i in range(first, min(first + sw_batch_size, total))]
        window = torch.cat([inputs[(slice(b, b + 1), slice(None), *s)] for b, s in index]).to(sw_device)
        pred = predictor(window)
        if not torch.is_tensor(pred) or pred.shape[0] != len(index) or tuple(pred.shape[2:]) != roi:
            got = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
            raise ValueError(f"predictor must map ({len(index)}, C, *{roi}) to ({len(index)}, K, *{roi}), got {got}")
        if output is None:
            output = torch.zeros((batch, pred.shape[1], *image_size), dtype=dtype, device=device)
        # in place, as MONAI does: an autocast (bf16 / fp16) output is weighted in its own dtype
        pred *= weights
        pred = pred.to(device)
        for (b, s), p in zip(index, pred, strict=True):
            output[(slice(b, b + 1), slice(None), *s)] += p
    assert output is not None  # total >= 1
    output /= count

    if padded:
        output = output[(slice(None), slice(None), *(slice(b, b + n) for b, n in zip(before, shape, strict=True)))]
    return output

