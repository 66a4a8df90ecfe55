"""Supervised parts of omni pre-training on top of the shared loop (:func:`voco.train.loop.train`).

* :class:`LabelledPool` — labelled cases from one or more stores, their labels mapped into the model's classes
  (VoComni), and per-case class masks (which classes the case's source annotates).
* :func:`labelled_batches` — a deterministic batch factory (seeded by epoch and batch index, so resume needs no
  replay) of ``n`` crops per step sampled ``pos:neg`` (SPEC 3: 9:1, 4 per step).
* :func:`supervised_step` — DiceCE (marginal over unannotated classes) through the full decoder.
* :func:`train_supervised` — a supervised run (VoComni ensemble members).

The stage 1 / stage 2 runs that add the VoCo SSL loss live in :mod:`voco.omni.stages`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from voco.data.augment import augment_crops
from voco.data.store import Store
from voco.errors import DataError
from voco.omni.labelmaps import map_label
from voco.omni.losses import dice_ce
from voco.omni.sampling import PosNegSampler

log = logging.getLogger(__name__)


@dataclass
class PoolSource:
    """One store in a labelled pool: its label -> class look-up table and annotated-class mask."""

    store: Store
    lut: np.ndarray | None  # None: labels are already in the model's classes
    annotated: np.ndarray  # bool (C,)
    ids: list[str] = field(default_factory=list)


class LabelledPool:
    """Labelled crops from several stores, labels mapped into one class space.

    Args:
        sources: the stores (with their maps); only their ok labelled cases are used.
        n_classes: C, the model's output channels (with background).
    """

    def __init__(self, sources: Sequence[PoolSource], n_classes: int) -> None:
        self.sources = list(sources)
        self.n_classes = n_classes
        self.keys: list[tuple[int, str]] = []
        for i, s in enumerate(self.sources):
            if not s.ids:
                s.ids = s.store.ids(labelled=True)
            self.keys += [(i, c) for c in s.ids]
        if not self.keys:
            roots = ", ".join(str(s.store.root) for s in self.sources)
            raise DataError(f"no ok labelled cases in {roots}: nothing to train the supervised loss on")

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, key: tuple[int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        src = self.sources[key[0]]
        case = src.store.load(key[1])
        if case.label is None:
            raise DataError(f"{src.store.root}: case {key[1]} has no label")
        return case.image, case.label, case.fg

    def map_crop(self, key: tuple[int, str], crop: np.ndarray) -> np.ndarray:
        lut = self.sources[key[0]].lut
        return crop if lut is None else map_label(crop, lut, f"{self.sources[key[0]].store.root}/{key[1]}")

    def mask(self, key: tuple[int, str]) -> np.ndarray:
        return self.sources[key[0]].annotated


def full_mask(n_classes: int) -> np.ndarray:
    return np.ones(n_classes, dtype=bool)


class RestrictedOutputs(nn.Module):
    """Wrap a segmentation model so that the classes no source annotates get a logit of -1e4 (probability ~0).

    With partial labels those classes would otherwise be "free" (the marginal loss counts them as background in every
    source) and soak up the background probability; the ensemble members learn only what some source teaches.
    """

    def __init__(self, model: nn.Module, valid: np.ndarray) -> None:
        super().__init__()
        self.model = model
        bias = torch.zeros(1, len(valid), 1, 1, 1)
        bias[0, ~torch.as_tensor(np.asarray(valid, dtype=bool)), 0, 0, 0] = -1e4
        bias[0, 0] = 0.0
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.bias.to(x.dtype)


class LabelledBatches:
    """Batch factory for the shared loop: ``factory(epoch, start)`` -> iterable of ``epoch_len`` batches.

    Batch ``i`` of epoch ``e`` is drawn with an RNG seeded by ``(seed, e, i)``: deterministic, and skipping ``start``
    batches on resume costs nothing.

    Each batch: ``{"image": (n, 1, *roi) float32, "label": (n, 1, *roi) int64, "mask": (n, C) bool}``; with
    ``augment`` (flip_p, rot90_p, intensity, intensity_p) every crop is augmented (:mod:`voco.data.augment`).
    """

    def __init__(
        self,
        pool: LabelledPool,
        roi: Sequence[int],
        n: int = 4,
        pos_neg: Sequence[float] = (9, 1),
        seed: int = 0,
        epoch_len: int = 100,
        augment: Mapping[str, Any] | None = None,
    ) -> None:
        self.pool = pool
        self.augment = dict(augment or {})
        self.n = int(n)
        self.seed = int(seed)
        self.epoch_len = int(epoch_len)
        self.sampler = PosNegSampler(pool.keys, pool.load, roi, float(pos_neg[0]), float(pos_neg[1]), seed)

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        self.sampler.rng = np.random.default_rng([self.seed, epoch, index])
        imgs, labs, keys = self.sampler.sample(self.n)
        labs = np.stack([self.pool.map_crop(k, y) for k, y in zip(keys, labs, strict=True)])
        masks = np.stack([self.pool.mask(k) for k in keys])
        image = torch.from_numpy(imgs)
        label = torch.from_numpy(labs.astype(np.int64))[:, None]
        if self.augment:
            # SPEC 6 recipe, drawn from this batch's own RNG (deterministic per (seed, epoch, index))
            image, label = augment_crops(image, label, self.augment, self.sampler.rng)
        return {"image": image, "label": label, "mask": torch.from_numpy(masks)}

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(start, self.epoch_len):
            yield self.batch(epoch, i)


def supervised_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """DiceCE of ``model(image)`` against the labels; marginal where the batch's class mask is partial."""
    logits = model(batch["image"])
    mask = batch.get("mask")
    if mask is not None and bool(mask.all()):
        mask = None
    return dice_ce(logits, batch["label"], mask)


def supervised_step(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loss = supervised_loss(model, batch)
    return {"total": loss, "dice_ce": loss.detach()}


def train_supervised(
    model: nn.Module,
    pool: LabelledPool,
    out_dir: Any,
    steps: int,
    roi: Sequence[int],
    crops: int = 4,
    pos_neg: Sequence[float] = (9, 1),
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    warmup: int = 0,
    seed: int = 0,
    stage: str = "member",
    method: str = "vocomni",
    run_config: Mapping[str, Any] | None = None,
    checkpoint_every: int = 1000,
    identity: Mapping[str, Any] | None = None,
    finish: bool = True,
):
    """Train ``model`` with DiceCE on ``pool`` through the shared loop (resumable); returns the loop's TrainResult.

    ``identity`` / ``finish``: as :func:`voco.train.loop.train` (a checkpoint of other settings is not resumed; with
    ``finish=False`` the resumable ``last.pt`` stays until the caller's outputs exist).
    """
    from voco.train.loop import LoopConfig, train

    cfg = LoopConfig(
        steps=int(steps), lr=lr, weight_decay=weight_decay, warmup=warmup, seed=seed, stage=stage, method=method,
        checkpoint_every=checkpoint_every, log_every=max(1, steps // 10),
    )
    batches = LabelledBatches(pool, roi, crops, pos_neg, seed)
    return train(
        model, supervised_step, batches, cfg, out_dir, run_config=run_config, identity=identity, finish=finish,
        crops_per_step=crops, progress_title=f"{method} {stage}",
    )
