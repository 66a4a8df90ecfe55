"""Omni-supervised pre-training stages 1 and 2 (SPEC 3) on the shared loop.

Stage 1 (``voco pretrain --stage 1``): every step adds to the VoCo loss L_SSL (the SSL stage's own step, on crops of
the pre-training corpus) a DiceCE (softmax, one-hot, background excluded) on ``labelled_crops`` crops of the VoComni
store, sampled ``pos:neg`` (9:1), through the full decoder.

Stage 2 (``voco pretrain --stage 2``): starts from stage 1's ``final.pt`` *as a resume*: model, projector teacher,
optimiser, scheduler, RNG and the global step carry over, so the stage switch is a global step (``stage1_steps``) and
stage 2 runs to ``stage1_steps + stage2_steps``. Loss: L_SSL + DiceCE on labelled crops + DiceCE on pseudo-labelled
crops (``stage2_pseudo: offline``, the volumes ``voco pseudolabel`` kept), or, with ``stage2_pseudo: online`` (the
reference), DiceCE of the decoder alone (encoder parameters detached) against the argmax of a frozen snapshot of the
model taken at the switch, on the SSL random crops.

Both stages follow one learning-rate schedule (warmup, then cosine to 0 at ``stage1_steps + stage2_steps``): stage 1
runs its first part and stage 2 resumes the same scheduler at the switch, so the rate does not restart (SPEC 3/4).
Labelled and pseudo-labelled crops get the SPEC 6 augmentation (``pretrain.omni.augment``: flips, x-y rot90,
intensity scale / shift). Both stages are resumable (the loop's ``last.pt`` / ``final.pt``); iterators are re-created
when exhausted (the loop's batch stream). Checkpoints record ``stage`` (``stage1`` / ``stage2``), the global ``step``
and the run's identity (settings, stage 2's init checksum, the stores' manifests): a checkpoint of other settings is
not resumed. The run folder also gets ``backbone.pt`` (for fine-tuning) and ``summary.json``; ``last.pt`` stays until
all outputs exist.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voco.errors import CheckpointError, ConfigError, DataError
from voco.omni.losses import dice_ce
from voco.omni.stage import LabelledBatches, LabelledPool, PoolSource, full_mask

log = logging.getLogger(__name__)

STAGE_NAMES = {"1": "stage1", "2": "stage2"}
#: SPEC 6 augmentation of labelled / pseudo-labelled crops (the schema default of pretrain.omni.augment)
PAPER_AUGMENT = {"flip_p": 0.2, "rot90_p": 0.2, "intensity": 0.1, "intensity_p": 0.1}


class OmniNet(nn.Module):
    """The SSL student (backbone embedding -> dropout -> projector) plus the backbone's full segmentation path.

    ``forward(ssl_x, seg_x=None, online_x=None) -> (z, emb, logits, online_logits)``: one call per step (DDP).
    ``online_logits`` come from the backbone with every non-decoder parameter detached (decoder-only training).
    """

    def __init__(self, ssl_net: nn.Module) -> None:
        super().__init__()
        from voco.models import decoder_parameter_names

        self.ssl = ssl_net
        self._decoder = set(decoder_parameter_names(ssl_net.backbone))

    @property
    def backbone(self) -> nn.Module:
        return self.ssl.backbone

    def forward(
        self,
        ssl_x: torch.Tensor,
        seg_x: torch.Tensor | None = None,
        online_x: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        z, emb = self.ssl(ssl_x)
        logits = self.ssl.backbone(seg_x) if seg_x is not None else None
        online = None
        if online_x is not None:
            if not self._decoder:
                raise ConfigError("stage2_pseudo: online needs a backbone with a known decoder (decoder_prefixes)")
            params = {n: p if n in self._decoder else p.detach() for n, p in self.ssl.backbone.named_parameters()}
            online = torch.func.functional_call(self.ssl.backbone, params, (online_x,))
        return z, emb, logits, online


class OmniBatches:
    """Batch factory: the SSL stage's batches, each joined with a labelled batch (and a pseudo-labelled batch)."""

    def __init__(self, ssl_batches: Any, labelled: LabelledBatches, pseudo: LabelledBatches | None = None) -> None:
        self.ssl_batches = ssl_batches
        self.labelled = labelled
        self.pseudo = pseudo

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        for i, sb in enumerate(self.ssl_batches(epoch, start), start):
            out = {"ssl": sb, "lab": self.labelled.batch(epoch, i)}
            if self.pseudo is not None:
                out["pseudo"] = self.pseudo.batch(epoch, i)
            yield out


class _Precomputed:
    """Stands in for the SSL student inside the SSL stage's step: returns the projections this step already computed
    (one forward per step, as DDP needs) and exposes the real student's attributes (projector, backbone ...)."""

    def __init__(self, student: nn.Module, z: torch.Tensor, emb: torch.Tensor) -> None:
        self._student, self._out = student, (z, emb)

    def __call__(self, _x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._student, name)


def make_omni_step(
    ssl_step: Any,
    omni: Mapping[str, Any],
    online_teacher: nn.Module | None = None,
):
    """The loop's step: L_SSL (``ssl_step`` on the precomputed projections) + weighted DiceCE terms."""
    w_sup = float(omni.get("sup_weight", 1.0))
    w_pseudo = float(omni.get("pseudo_weight", 1.0))

    def step(net: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        sb, lab = batch["ssl"], batch["lab"]
        pseudo = batch.get("pseudo")
        x = torch.cat([sb["rand"], sb["base"]])
        seg = [lab["image"]] + ([pseudo["image"]] if pseudo is not None else [])
        online_x = sb["rand"] if online_teacher is not None else None
        z, emb, logits, online = net(x, torch.cat(seg), online_x)
        bare = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
        out = dict(ssl_step(_Precomputed(bare.ssl, z, emb), sb))
        total = out["total"]
        out["ssl"] = total.detach()
        n = lab["image"].shape[0]
        mask = lab.get("mask")
        sup = dice_ce(logits[:n], lab["label"], None if mask is None or bool(mask.all()) else mask)
        out["sup"] = sup.detach()
        total = total + w_sup * sup
        if pseudo is not None:
            ps = dice_ce(logits[n:], pseudo["label"])
            out["pseudo"] = ps.detach()
            total = total + w_pseudo * ps
        if online is not None:
            with torch.no_grad():
                target = online_teacher(online_x).argmax(1, keepdim=True)
            ps = dice_ce(online, target)
            out["pseudo"] = ps.detach()
            total = total + w_pseudo * ps
        out["total"] = total
        return out

    return step


# ------------------------------------------------------------------------------------------------------- helpers
def labelled_pool(dirs: Sequence[str | Path], n_classes: int) -> LabelledPool:
    """Stores whose labels are already in the model's classes (VoComni / pseudo-labels): complete class masks."""
    from voco.data.store import Store

    return LabelledPool([PoolSource(Store(d), None, full_mask(n_classes)) for d in dirs], n_classes)


def pseudo_dirs(path: str | Path) -> list[Path]:
    """``path`` itself when it holds ``manifest.parquet``, else its sub-folders that do (one per dataset)."""
    p = Path(path)
    if (p / "manifest.parquet").is_file():
        return [p]
    subs = sorted(d for d in p.iterdir() if (d / "manifest.parquet").is_file()) if p.is_dir() else []
    if not subs:
        raise DataError(f"{p}: no pseudo-label store (manifest.parquet) here or in its sub-folders; run voco pseudolabel")
    return subs


def model_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    m = cfg.get("model", {}) or {}
    return {"name": m.get("name", "cnn_small"), "size": m.get("size", "B"), "feature_size": m.get("feature_size"),
            "use_checkpoint": bool(m.get("use_checkpoint", False)), "window_attention": m.get("window_attention")}


def build_omni(cfg: Mapping[str, Any], method: str, ssl: Mapping[str, Any], n_classes: int) -> tuple[OmniNet, Any]:
    """Student (backbone with ``n_classes`` outputs + projector) and the EMA teacher, as the SSL stage builds them."""
    from voco.models import MIN_SIDE, build_model
    from voco.ssl.heads import FeatureDropout, Projector
    from voco.train.pretrain_ssl import SSLNet, make_teacher

    m = model_settings(cfg)
    side = int(ssl.get("out_size", 64)) if method == "voco-v1" else int(ssl["roi"])
    if side % MIN_SIDE[m["name"]]:
        raise ConfigError(f"model {m['name']} needs crop sides that are multiples of {MIN_SIDE[m['name']]}; "
                          f"the SSL crop is {side}")
    kwargs = {"use_checkpoint": True} if m["name"] == "swinunetr" and m["use_checkpoint"] else {}
    backbone = build_model(m["name"], 1, n_classes, size=m["size"], feature_size=m["feature_size"],
                           window_attention=m["window_attention"], **kwargs)
    hidden, out_dim = int(ssl["hidden_dim"]), int(ssl["out_dim"])
    student = SSLNet(backbone, Projector(backbone.embed_dim, hidden, out_dim),
                     FeatureDropout(float(ssl.get("feature_dropout_p", 0.2)), str(ssl.get("feature_dropout", "row"))))
    teacher = make_teacher(method, backbone.embed_dim, ssl, lambda: build_model(
        m["name"], 1, n_classes, size=m["size"], feature_size=m["feature_size"],
        window_attention=m["window_attention"], **kwargs))
    return OmniNet(student), teacher


def backbone_state(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors from an OmniNet state dict (``ssl.backbone.`` prefix stripped)."""
    pre = "ssl.backbone."
    return {k[len(pre):]: v for k, v in model_state.items() if k.startswith(pre)}


def load_stage_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The segmentation backbone of an omni stage checkpoint (``final.pt``), built from the config it records.

    Returns:
        (model in eval mode, the checkpoint's config).
    Raises:
        CheckpointError: the file is not an omni stage checkpoint.
    """
    from voco.models import build_model
    from voco.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    cfg = state.get("config") or {}
    if state.get("stage") not in ("stage1", "stage2") or "vocomni" not in cfg:
        raise CheckpointError(f"{path}: not an omni stage-1/2 checkpoint (stage {state.get('stage')!r})")
    m = model_settings(cfg)
    n_classes = len(cfg["vocomni"]["classes"])
    model = build_model(m["name"], 1, n_classes, size=m["size"], feature_size=m["feature_size"],
                        window_attention=m["window_attention"])
    model.load_state_dict(backbone_state(state["model"]))
    model.eval()
    return model, cfg


def schedule_length(omni: Mapping[str, Any], switch: int, total: int, stage: str) -> int:
    """Length of the one learning-rate schedule shared by both stages (SPEC 3/4: no restart at the switch).

    Stage 1 runs steps 1..``stage1_steps`` of a warmup + cosine schedule that reaches 0 at
    ``stage1_steps + stage2_steps``; stage 2 resumes the same scheduler at the switch. A ``--steps`` override of one
    stage moves the end of the schedule with it (stage 1: ``total + stage2_steps``; stage 2: ``total``).
    """
    s2 = int(omni["stage2_steps"])
    if stage == "1":
        return total + s2
    return max(total, switch + s2)


def seed_stage2(init: Path, out: Path, identity: Mapping[str, Any] | None = None, method: str | None = None) -> int:
    """Start stage 2 from stage 1's final checkpoint: write it as ``out/last.pt`` with stage ``stage2`` (the loop then
    resumes at the switch step with model, teacher, optimiser, scheduler and RNG carried over). Returns the step.

    A stage-2 checkpoint of this run (same ``identity``) already in ``out`` is resumed instead; one of another run
    (other settings, another stage-1 checkpoint) is removed first, saying what differs.
    """
    from voco.train import distributed as dist
    from voco.train.checkpoint import LAST, load_checkpoint, prepare_run_dir, save_checkpoint

    state = load_checkpoint(init)
    if state.get("stage") != "stage1":
        raise CheckpointError(f"{init}: stage 2 starts from a stage-1 checkpoint, this one is {state.get('stage')!r}")
    switch = int(state["step"])
    found, _ = prepare_run_dir(out, identity, "stage2", method)
    if found is not None:
        return switch
    if dist.is_main():
        state["stage"] = "stage2"
        state["data"] = {"epoch": 0, "offset": 0}
        state["extra"] = {}
        state["metrics"] = None  # stage 2's metrics.jsonl starts at the switch (stage 1's curves stay in stage1/)
        state["switch"] = {"from": str(init), "step": switch}
        state["identity"] = identity
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out / LAST, state)
        log.info("stage 2 starts from %s at global step %d", init, switch)
    dist.barrier()
    return switch


# ---------------------------------------------------------------------------------------------------------- run
def run_stage(cfg: Mapping[str, Any], args: argparse.Namespace) -> int:
    """``voco pretrain --stage 1|2``."""
    from dataclasses import asdict

    from voco.io import write_json
    from voco.train import distributed as dist
    from voco.train.checkpoint import finish_run, load_checkpoint, run_identity, seed_everything, store_manifests
    from voco.train.loop import train
    from voco.train.pretrain_ssl import (
        SSLBatches,
        collect_volumes,
        loader_workers,
        loop_config,
        make_step,
        save_backbone,
        ssl_settings,
    )

    stage = str(args.stage)
    name = STAGE_NAMES[stage]
    method = args.method if args.method in ("voco", "voco-v1") else "voco"
    out = Path(args.out)
    pre = cfg.get("pretrain", {})
    omni = dict(pre.get("omni", {}))
    classes = list(cfg["vocomni"]["classes"])
    ssl = ssl_settings(cfg, method)
    if omni.get("sw") is not None and method == "voco":  # the omni stages' own random-crop count (reference: 4)
        ssl = {**ssl, "sw": int(omni["sw"])}
    roi = list(omni.get("roi") or cfg["preprocess"]["roi"])
    labelled_dirs = list(args.labelled or [omni.get("labelled") or Path(cfg["paths"]["data"]) / "vocomni"])
    rank = dist.rank()

    switch = 0
    online = stage == "2" and omni.get("stage2_pseudo", "offline") == "online"
    batch_size = int(getattr(args, "batch_size", None) or omni.get("batch_size") or pre.get("batch_size", 4))
    workers = loader_workers(cfg, args)
    init = None
    pseudo_in: list[Path] = []
    if stage == "1":
        total = int(args.steps or omni["stage1_steps"])
    else:
        init = Path(args.init or out.parent / "stage1" / "final.pt")
        total = int(args.steps or omni["stage2_steps"])  # + the switch step, known once the init is read
        if not online:
            pseudo_in = pseudo_dirs(args.pseudo or out.parent / "pseudo")
    # the omni keys this stage's training reads (pseudo-labelling settings reach stage 2 through its pseudo stores)
    not_read = {"labelled", "unlabelled", "pseudo_min_confidence", "pseudo_overlap", "sw_batch_size"}
    if stage == "1":
        # stage2_steps stays: stage 1 runs the first part of the schedule that ends at stage1_steps + stage2_steps
        not_read |= {"stage2_pseudo", "pseudo_weight", "pseudo_crops"}
    omni_id = {k: v for k, v in omni.items() if k not in not_read}
    loop_id = asdict(loop_config(cfg, method, stage=name, steps=total, seed=getattr(args, "seed", None),
                                 lr=omni.get("lr"), warmup=omni.get("warmup")))  # steps: this stage's own
    identity = run_identity(
        {"model": dict(cfg.get("model", {})), "loop": loop_id, "omni": omni_id, "ssl": dict(ssl), "classes": classes,
         "roi": roi, "batch_size": batch_size},
        init=init,
        data={**store_manifests(args.prep), **store_manifests(labelled_dirs, "labelled:"),
              **store_manifests(pseudo_in, "pseudo:")},
    )
    if stage == "2":
        switch = seed_stage2(init, out, identity, method)
        total = switch + total
    lcfg = loop_config(cfg, method, stage=name, steps=total, seed=getattr(args, "seed", None),
                       lr=omni.get("lr"), warmup=omni.get("warmup"),
                       schedule_steps=schedule_length(omni, switch, total, stage))

    seed_everything(lcfg.seed)
    net, teacher = build_omni(cfg, method, ssl, len(classes))
    device = dist.default_device()
    teacher.to(device)
    online_teacher = None
    if online:
        init_state = load_checkpoint(init)
        online_teacher = copy.deepcopy(net.backbone)
        online_teacher.load_state_dict(backbone_state(init_state["model"]))
        online_teacher.requires_grad_(False)
        online_teacher.eval().to(device)
        del init_state

    volumes = collect_volumes(args.prep)
    ssl_batches = SSLBatches(volumes, batch_size, ssl, method, lcfg.seed, workers,
                             region_weights=ssl.get("region_weights"),
                             region_mode=str(ssl.get("region_mode", "volume")),
                             default_region_weight=float(ssl.get("default_region_weight", 1.0)))
    pos_neg = omni.get("pos_neg", [9, 1])
    lab_pool = labelled_pool(labelled_dirs, len(classes))
    aug = omni.get("augment", PAPER_AUGMENT)
    lab = LabelledBatches(lab_pool, roi, int(omni.get("labelled_crops", 4)), pos_neg, seed=lcfg.seed * 1009 + 11 + rank,
                          augment=aug)
    pseudo = None
    pseudo_info: dict[str, Any] = {}
    if stage == "2" and not online:
        dirs = pseudo_in
        pseudo_info = {"dirs": [str(d) for d in dirs], "volumes": 0, "crops": 0}
        try:
            pool = labelled_pool(dirs, len(classes))
        except DataError:
            # every pseudo-labelled volume is under the confidence threshold (listed in low_confidence.csv)
            log.warning("stage 2: no pseudo-labelled volume passed pretrain.omni.pseudo_min_confidence in %s; "
                        "stage 2 runs with L_SSL + labelled DiceCE only", [str(d) for d in dirs])
        else:
            pseudo = LabelledBatches(pool, roi, int(omni.get("pseudo_crops", 4)), pos_neg,
                                     seed=lcfg.seed * 1009 + 23 + rank, augment=aug)
            pseudo_info["volumes"] = len(pool)
    batches = OmniBatches(ssl_batches, lab, pseudo)
    ssl_step = make_step(method, teacher, ssl)
    step = make_omni_step(ssl_step, omni, online_teacher)
    n_crops = batch_size * (int(ssl["sw"]) + int(ssl["grid"]) ** 2) + lab.n + (pseudo.n if pseudo else 0)
    if dist.is_main():
        log.info("omni %s (%s): %d SSL volumes, %d labelled volumes from %s%s; steps %d..%d; %d crops/step",
                 name, method, len(volumes), len(lab_pool), [str(d) for d in labelled_dirs],
                 f", pseudo-labelled {pseudo_info}" if pseudo_info else (", online pseudo-labels" if online else ""),
                 switch + 1, total, n_crops)

    def after_step(_step: int, model: nn.Module) -> None:
        teacher.update(model.ssl if method == "voco-v1" else model.ssl.projector)

    run_config = dict(cfg)
    result = train(
        net, step, batches, lcfg, out, ema=teacher, after_step=after_step,
        extra_state={"online_teacher": online_teacher} if online_teacher is not None else None,
        run_config=run_config, identity=identity, finish=False, crops_per_step=n_crops,
        progress_title=f"omni {name} ({method}, {model_settings(cfg)['name']})", chance=1.0 / int(ssl["grid"]) ** 2,
    )
    if dist.is_main():
        from voco.models.record import backbone_meta

        save_backbone(net.ssl, out / "backbone.pt", backbone_meta(
            model_settings(cfg), len(classes), [*args.prep, *labelled_dirs], dict(enumerate(classes)),
            {"stage": name, "method": method, "steps": result.step, "roi": list(roi), "ssl_crop": int(ssl["roi"])}))
        from voco.train.progress import read_metrics

        recs = read_metrics(out / "metrics.jsonl")
        tail = recs[-max(1, len(recs) // 10):]

        def mean(key: str) -> float | None:
            vals = [float(r[key]) for r in tail if key in r]
            return float(np.mean(vals)) if vals else None

        stage_steps = result.step - switch
        if pseudo is not None:
            pseudo_info["crops"] = pseudo.n * stage_steps
        write_json(out / "summary.json", {
            "stage": name, "method": method, "global_step": result.step, "switch_step": switch,
            "labelled_crops": lab.n * stage_steps, "augment": dict(aug or {}),
            "stage_steps": stage_steps, "stage2_pseudo": omni.get("stage2_pseudo") if stage == "2" else None,
            "labelled": [str(d) for d in labelled_dirs], "labelled_volumes": len(lab_pool), "pseudo": pseudo_info,
            "ssl_volumes": len(volumes), "loss_final": mean("total"), "sup_final": mean("sup"),
            "pseudo_final": mean("pseudo"), "pretext_acc_final": mean("acc"), "train_time_s": recs[-1].get("time")
            if recs else None,
        })
        finish_run(out)  # final.pt, backbone.pt and summary.json exist: the resumable checkpoint can go
    dist.barrier()
    return 0
