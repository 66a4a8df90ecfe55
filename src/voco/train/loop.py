"""The one training loop used by every stage (SSL pre-training, omni stages, SuPreM, fine-tuning).

A stage supplies:

* ``model``: the trainable ``nn.Module`` (parameters with ``requires_grad`` are optimised; wrap several networks in one
  ``nn.ModuleDict`` / module). Under torchrun it is wrapped in DDP; ``step`` must call it through ``model(...)``
  (one forward per step) so that DDP synchronises gradients.
* ``step(model, batch) -> dict`` of scalar tensors including ``"total"`` (the loss that is back-propagated); other
  entries (loss terms, accuracies) are logged. Non-scalar entries are ignored.
* ``batches(epoch)`` (optionally ``batches(epoch, start)``): a factory returning an iterable of batches; it is called
  again with ``epoch + 1`` whenever the iterable is exhausted. For exact resume it must be deterministic given
  ``epoch`` (seed any sampler / ``DataLoader(generator=...)`` from it); with a ``start`` parameter it skips the first
  ``start`` batches itself, otherwise the loop drains them.
* ``LoopConfig``: steps (and the schedule's length when the run is one part of a longer schedule), optimiser and
  schedule, AMP, checkpoint interval, seed, stage and method names.
* optionally ``ema`` (any object with ``state_dict`` / ``load_state_dict``, e.g. ``voco.ssl.heads.EMA``),
  ``after_step(step, model)`` (called after every optimiser step, e.g. the EMA update) and ``extra_state``
  (more stateful objects to checkpoint).

The loop: AdamW + linear warmup + cosine, autocast (bf16 / fp16 + GradScaler) on CUDA and plain fp32 on CPU, DDP when
the process group is initialised, atomic checkpoints every N steps (``last.pt``, the one before kept as
``previous.pt``) and at the end (``final.pt``) with model, optimiser, scheduler, scaler, EMA, per-rank RNG states, data
position, global step and the run's identity; exact resume from the newest readable one whose identity matches the
job's (else a fresh start that says what differs); a tqdm bar on rank 0; ``metrics.jsonl`` (+ TensorBoard events)
every step, ``progress.png`` and the DVC metrics / plots files (:mod:`voco.train.progress`) at every checkpoint.

Stop requests (SIGTERM / SIGUSR1, :mod:`voco.train.preempt`): the step in flight finishes, ``last.pt`` is written and
:class:`voco.errors.Interrupted` is raised (the CLI exits 75); every DDP rank stops after the same step.

Numerics: a step whose loss or gradient norm is not finite is skipped (with fp16 the GradScaler also lowers its
scale); more than ``max_bad_steps`` skipped steps in a row fail the run loudly (VocoError), and no ``final.pt`` is written.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from voco import runtime
from voco.errors import Interrupted, VocoError
from voco.train import distributed as dist
from voco.train import preempt
from voco.train.checkpoint import (
    FINAL,
    LAST,
    PREVIOUS,
    capture_rng,
    finish_run,
    link_or_copy,
    normalise,
    prepare_run_dir,
    restore_rng,
    save_checkpoint,
    seed_everything,
)
from voco.train.progress import MetricsLog, plot_progress, restore_metrics, unpack_records, write_tracking

log = logging.getLogger(__name__)

AMP_MODES = ("auto", "bf16", "fp16", "off")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


StepFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]
BatchFactory = Callable[..., Iterable[Any]]


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings of one training run (SPEC 4 defaults)."""

    steps: int
    lr: float = 1e-4
    # length of the learning-rate schedule (None = ``steps``); a run that is one part of a longer schedule (omni
    # stage 1 of stage 1 + stage 2) sets the whole length, so that the next part continues the same curve
    schedule_steps: int | None = None
    weight_decay: float = 0.01
    warmup: int = 0
    amsgrad: bool = True
    schedule: str = "cosine"  # cosine (to 0 after warmup) | constant (after warmup)
    grad_clip: float | None = None
    amp: str = "auto"  # auto: bf16 if the GPU supports it else fp16, off on CPU; bf16 / fp16: also on CPU (tests)
    checkpoint_every: int = 100
    seed: int = 0
    log_every: int = 10
    stage: str = "ssl"
    method: str = "voco"
    max_bad_steps: int = 10  # consecutive skipped steps (non-finite loss / gradients, fp16 overflow) before failing

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], **overrides: Any) -> LoopConfig:
        """From a config section (unknown keys ignored) plus explicit overrides (None values ignored)."""
        names = {f.name for f in cls.__dataclass_fields__.values()}  # type: ignore[attr-defined]
        kw = {k: v for k, v in section.items() if k in names}
        kw.update({k: v for k, v in overrides.items() if v is not None and k in names})
        if "amp" in kw and isinstance(kw["amp"], bool):
            kw["amp"] = "auto" if kw["amp"] else "off"
        return cls(**kw)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise VocoError(f"training steps must be >= 1, got {self.steps}")
        if self.amp not in AMP_MODES:
            raise VocoError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.schedule not in ("cosine", "constant"):
            raise VocoError(f"schedule must be cosine or constant, got {self.schedule!r}")
        self.checkpoint_every = max(1, int(self.checkpoint_every))
        if self.schedule_steps is not None and int(self.schedule_steps) < self.steps:
            raise VocoError(f"schedule_steps ({self.schedule_steps}) must be >= steps ({self.steps})")

    @property
    def horizon(self) -> int:
        """Scheduler steps from warmup start to lr 0 (``schedule_steps``, else ``steps``)."""
        return int(self.schedule_steps) if self.schedule_steps is not None else self.steps


@dataclass
class TrainResult:
    final: Path
    step: int
    last: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    wall_s: float = 0.0


def lr_lambda(warmup: int, total: int, schedule: str = "cosine") -> Callable[[int], float]:
    """Multiplier of the base lr at scheduler step ``s``: linear warmup over ``warmup`` steps, then cosine to 0."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        t = min(1.0, (s - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device`` (None = full precision).

    ``auto``: bf16 where the GPU supports it, else fp16; full precision on CPU. ``bf16`` / ``fp16`` are honoured on
    every device (CPU autocast is slow: the same code path, for tests). ``off``: full precision.
    """
    if mode == "off" or (device.type != "cuda" and mode == "auto"):
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item()) if v.numel() == 1 else None
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return None


def _accepts_start(factory: BatchFactory) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "start" in params or len([p for p in params.values() if p.kind != p.VAR_KEYWORD]) >= 2


class _BatchStream:
    """Endless stream over ``factory(epoch)`` iterables, tracking (epoch, batches consumed) for resume."""

    def __init__(self, factory: BatchFactory, epoch: int = 0, offset: int = 0) -> None:
        self.factory = factory
        self.epoch, self.offset = epoch, offset
        self._start_kw = _accepts_start(factory)
        self._it: Iterator[Any] = self._open(offset)

    def _open(self, start: int) -> Iterator[Any]:
        if start and self._start_kw:
            return iter(self.factory(self.epoch, start))
        it = iter(self.factory(self.epoch, 0) if self._start_kw else self.factory(self.epoch))
        if start:
            it = itertools.islice(it, start, None)
        return it

    def next(self) -> Any:
        for _ in range(2):
            try:
                batch = next(self._it)
                self.offset += 1
                return batch
            except StopIteration:
                self.epoch += 1
                self.offset = 0
                self._it = self._open(0)
        raise VocoError(f"the batch factory returned an empty iterable for epoch {self.epoch}")


def _bare(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model



def _has_monai_attention(model: nn.Module) -> bool:
    """Whether ``model`` runs MONAI's own Swin ``WindowAttention`` (not :mod:`voco.models.window_attention`)."""
    for m in model.modules():
        cls = type(m)
        if cls.__name__ == "WindowAttention" and cls.__module__.startswith("monai."):
            return True
    return False

def train(
    model: nn.Module,
    step: StepFn,
    batches: BatchFactory,
    cfg: LoopConfig,
    out_dir: str | os.PathLike[str],
    *,
    ema: Stateful | None = None,
    after_step: Callable[[int, nn.Module], None] | None = None,
    extra_state: Mapping[str, Stateful] | None = None,
    run_config: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    crops_per_step: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | None = None,
    resume: bool = True,
    finish: bool = True,
    keep_files: tuple[str, ...] = (),
    find_unused_parameters: bool = False,
    progress_title: str = "",
    chance: float | None = None,
) -> TrainResult:
    """Run (or resume) ``cfg.steps`` optimiser steps; write checkpoints and progress files to ``out_dir``.

    Args:
        model: trainable module (moved to ``device``; wrapped in DDP when the process group is initialised).
        step: ``step(model, batch) -> {"total": loss, ...}`` (scalar tensors); runs under autocast on CUDA.
        batches: batch factory, ``batches(epoch)`` or ``batches(epoch, start)``.
        cfg: LoopConfig.
        out_dir: run folder (``last.pt``, ``previous.pt``, ``final.pt``, ``metrics.jsonl``, ``progress.png``).
        ema: EMA teacher (checkpointed under ``"ema"``); update it in ``after_step``.
        after_step: ``after_step(global_step, model)`` after each optimiser step (model unwrapped from DDP).
        extra_state: name -> stateful object, checkpointed under ``"extra"``.
        run_config: resolved config stored in every checkpoint.
        identity: what makes a checkpoint this run's (config values the job reads, init checksum, data); a checkpoint
            recording another identity is not resumed: the run starts afresh, saying what differs. None: not checked.
        crops_per_step: crops (network inputs) one process uses per step, for ``crops_per_s``.
        optimizer: a custom optimiser over ``model``'s parameters (default AdamW from ``cfg``).
        device: default ``cuda:LOCAL_RANK`` if available, else CPU.
        resume: continue from ``final.pt`` / ``last.pt`` / ``previous.pt`` in ``out_dir`` when present.
        finish: drop ``last.pt`` / ``previous.pt`` once ``final.pt`` exists. False when the caller writes more outputs
            (backbone.pt, summary.json ...): it calls :func:`voco.train.checkpoint.finish_run` when they all exist, so
            a job that dies in between resumes at its last step.
        keep_files: run-folder files the caller wrote for this run before training (kept on a fresh start, when
            every other file of :data:`voco.train.checkpoint.RUN_FILES` is removed).
        find_unused_parameters: passed to DDP (avoid by freezing unused parameters).
        progress_title: title of ``progress.png``.
        chance: drawn as a reference line on the accuracy panel (e.g. 1/9).
    Returns:
        TrainResult with the path of ``final.pt``.
    Raises:
        CheckpointError: the run folder holds a checkpoint of another stage / method.
        Interrupted: SIGTERM / SIGUSR1 arrived; ``last.pt`` holds the last completed step.
        VocoError: more than ``cfg.max_bad_steps`` consecutive steps were skipped (loss / gradients not finite).
    """
    with preempt.stop_on_signals():
        return _train(model, step, batches, cfg, Path(out_dir), ema=ema, after_step=after_step,
                      extra_state=extra_state, run_config=run_config, identity=identity,
                      crops_per_step=crops_per_step, optimizer=optimizer, device=device, resume=resume, finish=finish,
                      keep_files=keep_files, find_unused_parameters=find_unused_parameters,
                      progress_title=progress_title, chance=chance)


def _stop_requested(device: torch.device) -> bool:
    """Whether any rank received a stop signal (one small collective under DDP)."""
    flag = {"stop": 1.0 if preempt.requested() else 0.0}
    return dist.all_reduce_mean(flag, device)["stop"] > 0


def _train(
    model: nn.Module,
    step: StepFn,
    batches: BatchFactory,
    cfg: LoopConfig,
    out: Path,
    *,
    ema: Stateful | None,
    after_step: Callable[[int, nn.Module], None] | None,
    extra_state: Mapping[str, Stateful] | None,
    run_config: Mapping[str, Any] | None,
    identity: Mapping[str, Any] | None,
    crops_per_step: int | None,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device | None,
    resume: bool,
    finish: bool,
    keep_files: tuple[str, ...],
    find_unused_parameters: bool,
    progress_title: str,
    chance: float | None,
) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    device = device or dist.default_device()
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    if device.type == "cpu" and not _has_monai_attention(model):
        # reuse freed memory between steps instead of re-mapping it (voco.runtime). Not with MONAI's own window
        # attention (model.window_attention: monai): its per-window matrices fragment a heap that is never trimmed
        # (measured: peak 17.1 GiB instead of 9.5 for a SwinUNETR F 12 VoCo step)
        tuned = runtime.configure_malloc()
        if tuned and main:
            log.info("CPU runtime: %s", ", ".join(f"{k}={v}" for k, v in runtime.applied().items()))
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise VocoError("train: the model has no trainable parameters")
    opt = optimizer or torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.horizon, cfg.schedule))
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    identity = normalise(identity) if identity is not None else None

    start, epoch, offset, elapsed_before = 0, 0, 0, 0.0
    saved_metrics: list[dict[str, Any]] = []
    ckpt_path, state = prepare_run_dir(out, identity, cfg.stage, cfg.method, resume=resume, keep=keep_files)
    if state is not None:
        saved_metrics = unpack_records(state.get("metrics")) if rank == 0 else []
        _bare(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        for name, obj in (extra_state or {}).items():
            if name in (state.get("extra") or {}):
                obj.load_state_dict(state["extra"][name])
        start = int(state["step"])
        epoch, offset = int(state["data"]["epoch"]), int(state["data"]["offset"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if main:
            log.info("resuming from %s at step %d / %d", ckpt_path, start, cfg.steps)
    else:
        seed_everything(cfg.seed + rank)

    if start >= cfg.steps and ckpt_path is not None:
        if main:
            if ckpt_path.name != FINAL:  # training was done; final.pt was lost (e.g. removed with a failed job)
                link_or_copy(ckpt_path, out / FINAL)
            # metrics.jsonl / progress.png removed with the outputs of a failed job: restored from the checkpoint
            if restore_metrics(out / "metrics.jsonl", saved_metrics) or not (out / "progress.png").is_file():
                plot_progress(out / "metrics.jsonl", out / "progress.png", title=progress_title, chance=chance)
                write_tracking(out / "metrics.jsonl")
            log.info("%s already complete (step %d >= %d): nothing to train", ckpt_path, start, cfg.steps)
            if finish:
                finish_run(out)
        dist.barrier()
        return TrainResult(final=out / FINAL, step=start, resumed_from=start)

    if _stop_requested(device):
        raise Interrupted(preempt.requested() or "a stop signal (another rank)", start if state else None,
                          ckpt_path)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    # open the data stream before restoring RNG states: creating loader iterators may draw from the global RNG
    stream = _BatchStream(batches, epoch, offset)
    if state is not None:
        rngs = state.get("rng") or []
        if len(rngs) == world:
            restore_rng(rngs[rank])
        else:
            log.warning("checkpoint has RNG states of %d processes, this run has %d: reseeding", len(rngs), world)
            seed_everything(cfg.seed + rank + 7919 * start)
        del state

    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start, saved=saved_metrics) if main else None
    del saved_metrics
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=not main,
        dynamic_ncols=True,
        mininterval=0.5 if tty else 30.0,
        desc=f"{cfg.stage}/{cfg.method}",
        file=sys.stderr,
    )
    t_run = time.perf_counter()
    bad, first_bad = 0, 0
    last: dict[str, float] = {}

    def checkpoint(global_step: int) -> Path:
        """``last.pt`` at ``global_step`` (the one before becomes ``previous.pt``); rank 0 writes, all ranks wait."""
        rngs = dist.all_gather_object(capture_rng())
        if main:
            state_out = {
                "model": _bare(model).state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "ema": ema.state_dict() if ema is not None else None,
                "extra": {k: v.state_dict() for k, v in (extra_state or {}).items()},
                "rng": rngs,
                "step": global_step,
                "data": {"epoch": stream.epoch, "offset": stream.offset},
                "stage": cfg.stage,
                "method": cfg.method,
                "loop": asdict(cfg),
                "config": dict(run_config or {}),
                "identity": identity,
                "world_size": world,
                "elapsed_s": elapsed_before + time.perf_counter() - t_run,
                "metrics": metrics.packed() if metrics is not None else None,  # metrics.jsonl up to this step
            }
            save_checkpoint(out / LAST, state_out, previous=out / PREVIOUS)
            plot_progress(out / "metrics.jsonl", out / "progress.png", title=progress_title, chance=chance)
            write_tracking(out / "metrics.jsonl")
        dist.barrier()
        return out / LAST

    try:
        for global_step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = to_device(stream.next(), device)
            t_data = time.perf_counter() - t0
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with ctx:
                outputs = step(net, batch)
            if "total" not in outputs:
                raise VocoError("train: the step function must return a dict with a 'total' loss")
            loss = outputs["total"]
            finite_loss = bool(torch.isfinite(loss.detach()).all())
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            max_norm = cfg.grad_clip if cfg.grad_clip else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # DDP: gradients are all-reduced, so a non-finite loss on one rank makes the gradient norm non-finite on all
            if torch.isfinite(grad_norm) and (finite_loss or world > 1):
                scaler.step(opt)
                bad = 0
            else:
                bad += 1
                first_bad = first_bad if bad > 1 else global_step
                amp_note = f"; fp16 loss scale {scaler.get_scale():.3g}" if scaler.is_enabled() else ""
                if bad > cfg.max_bad_steps:
                    raise VocoError(
                        f"train: {bad} consecutive steps skipped (steps {first_bad}-{global_step}: loss "
                        f"{float(loss.detach().float()):.4g}, gradient norm {float(grad_norm):.4g}{amp_note}) > "
                        f"max_bad_steps {cfg.max_bad_steps}: the run diverged and {out / FINAL} was not written. "
                        "Lower the learning rate, train with amp bf16 or off, or resume from an earlier checkpoint"
                    )
                log.warning("step %d: loss %.4g, gradient norm %.4g not finite%s: optimiser step skipped (%d in a row)",
                            global_step, float(loss.detach().float()), float(grad_norm), amp_note, bad)
            scaler.update()
            lr_used = opt.param_groups[0]["lr"]
            sched.step()
            if after_step is not None:
                after_step(global_step, model)
            step_s = time.perf_counter() - t0

            values = {k: s for k, v in outputs.items() if (s := _scalar(v)) is not None}
            values["grad_norm"] = float(grad_norm)
            values["_stop"] = 1.0 if preempt.requested() else 0.0  # all-reduced with the metrics: one collective
            values = dist.all_reduce_mean(values, device)
            stop = values.pop("_stop") > 0
            if main:
                rec: dict[str, Any] = {"step": global_step, "epoch": stream.epoch}
                rec.update(values)
                rec["lr"] = lr_used
                rec["step_s"] = step_s
                rec["data_s"] = t_data
                if crops_per_step:
                    rec["crops_per_s"] = crops_per_step * world / max(step_s, 1e-9)
                rec["time"] = elapsed_before + time.perf_counter() - t_run
                metrics.write(rec)  # type: ignore[union-attr]
                last = rec
                bar.update(1)
                bar.set_postfix({k: f"{values[k]:.3g}" for k in list(values)[:4]}, refresh=False)
                if not tty and (global_step % cfg.log_every == 0 or global_step == cfg.steps):
                    terms = " ".join(f"{k}={v:.4g}" for k, v in values.items())
                    log.info("step %d/%d %s lr=%.3g %.2fs/step", global_step, cfg.steps, terms, rec["lr"], step_s)
            if stop and global_step < cfg.steps:
                path = checkpoint(global_step)
                waited = preempt.seconds_since_request()
                if main:
                    log.warning("stop requested (%s%s): checkpoint %s at step %d / %d written; exiting with status "
                                "75 (interrupted, resumable)", preempt.requested() or "another rank",
                                f", {waited:.1f} s ago" if waited is not None else "", path, global_step, cfg.steps)
                raise Interrupted(preempt.requested() or "a stop signal (another rank)", global_step, path)
            if global_step % cfg.checkpoint_every == 0 and global_step < cfg.steps and not bad:
                checkpoint(global_step)  # not inside a run of skipped steps: last.pt keeps the last good state
        # the finished state: last.pt (kept until the caller's outputs are complete), final.pt the same file
        path = checkpoint(cfg.steps)
        if main:
            link_or_copy(path, out / FINAL)
        dist.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if main and finish:
        finish_run(out)
    wall = time.perf_counter() - t_run
    if main:
        log.info("finished %d steps in %.1f s -> %s", cfg.steps - start, wall, out / FINAL)
    return TrainResult(final=out / FINAL, step=cfg.steps, last=last, resumed_from=start, wall_s=wall)
