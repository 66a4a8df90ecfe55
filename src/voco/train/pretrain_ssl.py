"""VoCo self-supervised pre-training stage (methods ``voco`` and ``voco-v1``, SPEC 2) on the shared training loop.

Data: every ``ok`` training case of the pre-processed stores, drawn region-balanced; each drawn volume gives g*g base
crops, ``sw`` random crops and their overlap position labels (``voco.ssl.crops``). Model: the student backbone's
pooled-encoder embedding -> feature dropout -> projector; the teacher is an EMA projector (``voco``: its own init,
momentum 0.9, the backbone shared) or an EMA network of its own (``voco-v1``: own backbone + projector from their own
init, no feature dropout, as the CVPR code). Logged per step: loss terms and pretext position accuracy. Writes
``final.pt`` (full training checkpoint), ``backbone.pt`` (backbone state dict in MONAI SwinUNETR / our naming, for
downstream), ``metrics.jsonl``, ``progress.png``, ``summary.json``; ``last.pt`` (the resumable checkpoint) stays until
all of them exist.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from voco.errors import ConfigError, DataError
from voco.io import write_json
from voco.models import MIN_SIDE, build_model, freeze_decoder
from voco.train import distributed as dist
from voco.train import preempt
from voco.train.checkpoint import finish_run, run_identity, seed_everything, store_manifests
from voco.train.loop import LoopConfig, train
from voco.train.progress import read_metrics
from voco.train.settings import VOCO_DEFAULTS, ssl_settings  # noqa: F401 - re-exported (stages import them here)

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Volume:
    store: str
    case_id: str
    region: str


def collect_volumes(prep_dirs: Sequence[str | os.PathLike[str]], split: str | None = "train") -> list[Volume]:
    """Every ok case (of ``split``) in the stores ``prep_dirs`` (each holds manifest.parquet)."""
    from voco.data.store import Store

    vols: list[Volume] = []
    for d in prep_dirs:
        store = Store(d)
        ids = store.ids(split=split) if split else store.ids()
        if not ids:
            log.warning("%s: no ok %s cases; left out of pre-training", d, split or "")
        vols.extend(Volume(str(d), cid, store.region(cid)) for cid in ids)
    if not vols:
        raise DataError(f"pre-training corpus is empty: no ok cases in {', '.join(map(str, prep_dirs))}")
    return vols


class VoCoViews(Dataset):
    """Item ``i`` of epoch ``e`` = VoCo views of volume ``order[i]``, drawn with ``default_rng([seed, e, i])``.

    Deterministic per (seed, epoch, index), whatever the worker or rank that loads it (exact resume, DDP parity).
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        order: np.ndarray,
        epoch: int,
        seed: int,
        ssl: Mapping[str, Any],
        method: str,
    ) -> None:
        self.volumes = list(volumes)
        self.order = np.asarray(order, dtype=np.int64)
        self.epoch, self.seed, self.ssl, self.method = epoch, seed, dict(ssl), method
        self._stores: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.order)

    def _image(self, vol: Volume) -> np.ndarray:
        from voco.data.store import Store

        if vol.store not in self._stores:
            self._stores[vol.store] = Store(vol.store)
        img = self._stores[vol.store].load(vol.case_id).image
        return img[0] if img.ndim == 4 else img  # SSL corpora are CT: first channel of a multi-channel case

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from voco.ssl.crops import sample_voco_views

        vol = self.volumes[int(self.order[i])]
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        s = self.ssl
        kw: dict[str, Any] = {"augment": s.get("augment"), "pad_value": float(s.get("pad_value", 0.0))}
        if self.method == "voco-v1":
            kw["out_size"] = int(s.get("out_size", 64))
        return sample_voco_views(self._image(vol), int(s["grid"]), int(s["roi"]), int(s["sw"]), rng, self.method, **kw)


class SSLBatches:
    """Batch factory for the loop: ``batches(epoch, start)`` -> DataLoader over this rank's share of the epoch.

    An epoch draws ``steps_per_epoch * B * world`` volume indices region-balanced from ``[seed, epoch]``; step t of
    rank r takes items ``[t*B*W + r*B, t*B*W + (r+1)*B)`` - so W processes at batch B see exactly what one process at
    batch B*W sees.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        batch_size: int,
        ssl: Mapping[str, Any],
        method: str,
        seed: int,
        num_workers: int = 0,
        region_weights: Mapping[str, float] | None = None,
        region_mode: str = "volume",
        default_region_weight: float = 1.0,
    ) -> None:
        self.volumes = list(volumes)
        self.batch_size = batch_size
        self.ssl, self.method, self.seed, self.num_workers = dict(ssl), method, seed, num_workers
        self.region_weights, self.region_mode = region_weights, region_mode
        self.default_region_weight = default_region_weight
        self.world, self.rank = dist.world_size(), dist.rank()
        self.steps_per_epoch = max(1, math.ceil(len(self.volumes) / (batch_size * self.world)))

    def __call__(self, epoch: int, start: int = 0) -> Iterable[dict[str, torch.Tensor]]:
        from voco.ssl.crops import collate_views, region_balanced_indices

        b, w, r = self.batch_size, self.world, self.rank
        n = self.steps_per_epoch * b * w
        order = region_balanced_indices(
            [v.region for v in self.volumes],
            n,
            np.random.default_rng([self.seed, epoch, 7]),
            self.region_weights,
            mode=self.region_mode,
            default_weight=self.default_region_weight,
        )
        mine = [t * b * w + r * b + k for t in range(start, self.steps_per_epoch) for k in range(b)]
        ds = VoCoViews(self.volumes, order, epoch, self.seed, self.ssl, self.method)
        gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return DataLoader(
            torch.utils.data.Subset(ds, mine),
            batch_size=b,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_views,
            generator=gen,
            worker_init_fn=preempt.ignore_in_worker,  # the training process handles SIGTERM / SIGUSR1
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
        )


# ---------------------------------------------------------------------------------------------------------- model
class SSLNet(nn.Module):
    """Student: backbone embedding -> feature dropout -> projector. ``forward(x) -> (projections, embeddings)``."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, dropout: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 1, r, r, r) -> projections (N, D_out) float32, embeddings (N, D_embed)."""
        emb = self.backbone.embed(x)
        z = self.projector(self.dropout(emb))
        return z.float(), emb


def build_ssl(cfg: Mapping[str, Any], method: str, ssl: Mapping[str, Any]) -> tuple[SSLNet, Any]:
    """Student network and EMA teacher for ``method``."""
    from voco.ssl.heads import FeatureDropout, Projector

    m = cfg.get("model", {})
    name = m.get("name", "cnn_small")
    side = int(ssl.get("out_size", 64)) if method == "voco-v1" else int(ssl["roi"])
    if side % MIN_SIDE[name]:
        raise ConfigError(
            f"model {name} needs crop sides that are multiples of {MIN_SIDE[name]}; the SSL crop is {side}"
        )
    kwargs = {"use_checkpoint": True} if name == "swinunetr" and m.get("use_checkpoint") else {}
    backbone = build_model(name, 1, 2, size=m.get("size", "B"), feature_size=m.get("feature_size"),
                           window_attention=m.get("window_attention"), **kwargs)
    n_frozen = freeze_decoder(backbone)
    log.info("SSL trains the encoder: %d decoder tensors frozen (they stay at init in backbone.pt)", n_frozen)
    hidden, out_dim = int(ssl["hidden_dim"]), int(ssl["out_dim"])
    projector = Projector(backbone.embed_dim, hidden, out_dim)
    dropout = FeatureDropout(float(ssl.get("feature_dropout_p", 0.2)), str(ssl.get("feature_dropout", "row")))
    student = SSLNet(backbone, projector, dropout)
    teacher = make_teacher(method, backbone.embed_dim, ssl, lambda: build_model(
        name, 1, 2, size=m.get("size", "B"), feature_size=m.get("feature_size"),
        window_attention=m.get("window_attention"), **kwargs))
    return student, teacher


def make_teacher(method: str, embed_dim: int, ssl: Mapping[str, Any], new_backbone: Callable[[], nn.Module]) -> Any:
    """The EMA teacher, from its own random init (drawn after the student's, so it differs from it).

    ``voco``: a projector on the ``embed_dim`` embedding (the backbone is shared with the student). ``voco-v1`` (the
    CVPR code): a whole network - a new backbone from ``new_backbone()`` plus a projector - without feature dropout;
    it never copies the student. Both are in eval mode (their BatchNorms use batch statistics in either mode).
    """
    from voco.ssl.heads import EMA, FeatureDropout, Projector

    hidden, out_dim = int(ssl["hidden_dim"]), int(ssl["out_dim"])
    momentum = float(ssl.get("momentum", 0.9))
    if method == "voco-v1":
        backbone = new_backbone()
        teacher = EMA(SSLNet(backbone, Projector(backbone.embed_dim, hidden, out_dim), FeatureDropout(0.0)), momentum)
    else:
        teacher = EMA(Projector(embed_dim, hidden, out_dim), momentum)
    teacher.eval()
    return teacher


def make_step(method: str, teacher: Any, ssl: Mapping[str, Any]):
    """The loop's ``step(model, batch)`` for ``method``: loss terms + pretext accuracy."""
    from voco.ssl.heads import split_views
    from voco.ssl.losses import pretext_accuracy, relu_cosine, voco_loss, voco_v1_loss

    loss_form = str(ssl.get("loss_form", "spec"))
    symmetric = bool(ssl.get("symmetric", True))
    weights = {k: float(ssl[k]) for k in ("w_pred", "w_inter", "w_reg") if k in ssl}

    def step(net: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"].float()
        b, sw, n = labels.shape
        x = torch.cat([batch["rand"], batch["base"]])
        z, emb = net(x)
        if method == "voco-v1":
            t = teacher(x)[0].float()
        else:
            t = teacher(emb.detach()).float()
        s_rand, s_base = split_views(z, b, sw, n)
        t_rand, t_base = split_views(t, b, sw, n)
        if method == "voco-v1":
            w = {k: v for k, v in weights.items() if k != "w_inter"}
            losses = voco_v1_loss(s_rand, s_base, t_rand, t_base, labels, symmetric=symmetric, **w)
        else:
            losses = voco_loss(s_rand, s_base, t_rand, t_base, labels, loss_form=loss_form, **weights)
        out = {k: v for k, v in losses.items() if k != "sim"}
        # pretext accuracy of the model itself: student projections without feature dropout (a dropped row has no
        # position to predict), against the teacher's base crops; the loss's own P (with dropout) is acc_dropout
        with torch.no_grad():
            student = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
            clean_rand, _ = split_views(student.projector(emb.detach()).float(), b, sw, n)
            out["acc"] = pretext_accuracy(relu_cosine(clean_rand, t_base), labels)
        out["acc_dropout"] = pretext_accuracy(losses["sim"], labels)
        return out

    return step


# ------------------------------------------------------------------------------------------------------------ run
def loop_config(
    cfg: Mapping[str, Any], method: str, stage: str = "ssl", steps: int | None = None, **over: Any
) -> LoopConfig:
    section = dict(cfg.get("pretrain", {}))
    return LoopConfig.from_mapping(section, steps=steps, stage=stage, method=method, **over)


def save_backbone(student: SSLNet, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> Path:
    """The backbone's weights (MONAI SwinUNETR / our names) as a self-describing model file (``{"model", "meta"}``,
    :mod:`voco.models.record`), atomically."""
    from voco.models.record import save_model

    return save_model(path, student.backbone.state_dict(), meta or {})


def loader_workers(cfg: Mapping[str, Any], args: argparse.Namespace) -> int:
    """DataLoader workers: ``--num-workers``, else ``pretrain.num_workers`` (an int, or ``auto``: the job's CPUs)."""
    value = getattr(args, "num_workers", None)
    return dist.resolve_num_workers(cfg.get("pretrain", {}).get("num_workers", 0) if value is None else value)


def ssl_identity(
    cfg: Mapping[str, Any], method: str, ssl: Mapping[str, Any], lcfg: LoopConfig, batch_size: int, prep: Sequence[Any]
) -> dict[str, Any]:
    """What makes two SSL runs the same run: model, effective loop and SSL settings, batch, the stores' manifests."""
    from dataclasses import asdict

    return run_identity(
        {"model": dict(cfg.get("model", {})), "loop": asdict(lcfg), "ssl": dict(ssl), "batch_size": batch_size,
         "method": method},
        data=store_manifests(prep),
    )


def run_ssl(cfg: Mapping[str, Any], args: argparse.Namespace) -> int:
    """``voco pretrain --method voco|voco-v1``: pre-train, then write backbone.pt and summary.json."""
    method = args.method
    out = Path(args.out)
    pre = cfg.get("pretrain", {})
    ssl = ssl_settings(cfg, method)
    lcfg = loop_config(cfg, method, steps=args.steps, seed=getattr(args, "seed", None))
    batch_size = int(getattr(args, "batch_size", None) or pre.get("batch_size", 4))
    workers = loader_workers(cfg, args)

    seed_everything(lcfg.seed)
    student, teacher = build_ssl(cfg, method, ssl)
    device = dist.default_device()
    teacher.to(device)
    volumes = collect_volumes(args.prep)
    batches = SSLBatches(
        volumes,
        batch_size,
        ssl,
        method,
        lcfg.seed,
        workers,
        region_weights=ssl.get("region_weights"),
        region_mode=str(ssl.get("region_mode", "volume")),
        default_region_weight=float(ssl.get("default_region_weight", 1.0)),
    )
    n_crops = batch_size * (int(ssl["sw"]) + int(ssl["grid"]) ** 2)
    if dist.is_main():
        log.info(
            "torch %s, device %s, visible GPUs %d, world size %d",
            torch.__version__,
            device,
            dist.visible_gpus(),
            dist.world_size(),
        )
        log.info(
            "resolved config: model %s; pretrain %s; ssl %s",
            dict(cfg.get("model", {})),
            {k: v for k, v in pre.items() if not isinstance(v, dict)},
            ssl,
        )
        regions: dict[str, int] = {}
        for v in volumes:
            regions[v.region] = regions.get(v.region, 0) + 1
        log.info(
            "pre-training %s: %d volumes %s, model %s (embed %d), B=%d x %d process(es), %d crops/step/process, "
            "%d steps, device %s, %d loader workers",
            method,
            len(volumes),
            regions,
            cfg.get("model", {}).get("name"),
            student.backbone.embed_dim,
            batch_size,
            dist.world_size(),
            n_crops,
            lcfg.steps,
            device,
            workers,
        )

    def after_step(_step: int, model: nn.Module) -> None:
        teacher.update(model if method == "voco-v1" else model.projector)

    result = train(
        student,
        make_step(method, teacher, ssl),
        batches,
        lcfg,
        out,
        ema=teacher,
        after_step=after_step,
        run_config=dict(cfg),
        identity=ssl_identity(cfg, method, ssl, lcfg, batch_size, args.prep),
        finish=False,
        crops_per_step=n_crops,
        progress_title=f"VoCo pre-training ({method}, {cfg.get('model', {}).get('name')})",
        chance=1.0 / int(ssl["grid"]) ** 2,
    )
    if dist.is_main():
        from voco.models.record import backbone_meta

        save_backbone(student, out / "backbone.pt", backbone_meta(
            cfg.get("model", {}), 2, args.prep, training={"stage": "ssl", "method": method, "steps": result.step,
                                                     "crop": int(ssl["roi"]), "grid": int(ssl["grid"])}))
        write_json(out / "summary.json", summarize(out, method, cfg, ssl, batch_size, volumes, result.wall_s))
        finish_run(out)  # final.pt, backbone.pt and summary.json exist: the resumable checkpoint can go
    dist.barrier()
    return 0


def summarize(
    out: Path,
    method: str,
    cfg: Mapping[str, Any],
    ssl: Mapping[str, Any],
    batch_size: int,
    volumes: Sequence[Volume],
    wall_s: float,
) -> dict[str, Any]:
    """Headline figures of a finished run: pretext accuracy at the end (mean of the last 10% of steps), speed."""
    recs = read_metrics(out / "metrics.jsonl")
    tail = recs[-max(1, len(recs) // 10) :] if recs else []

    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [float(r[key]) for r in rows if key in r]
        return float(np.mean(vals)) if vals else None

    return {
        "method": method,
        "model": dict(cfg.get("model", {})),
        "ssl": {k: v for k, v in ssl.items() if isinstance(v, int | float | str | bool)},
        "batch_size": batch_size,
        "world_size": dist.world_size(),
        "volumes": len(volumes),
        "steps": recs[-1]["step"] if recs else 0,
        "chance": 1.0 / int(ssl["grid"]) ** 2,
        "pretext_acc_final": mean("acc", tail),
        "pretext_acc_first": mean("acc", recs[: max(1, len(recs) // 10)]),
        "loss_final": mean("total", tail),
        "crops_per_s": mean("crops_per_s", recs[1:] or recs),
        "train_time_s": recs[-1].get("time") if recs else None,
        "wall_s_this_process": wall_s,
    }
