"""Downstream fine-tuning (SPEC 6): segmentation (plain | MedContext) and classification, from any init.

One run = one (dataset, init, method, N, seed). It reads the pre-processed store, picks the training cases (the first N
of a seeded permutation for label efficiency), builds the model of the config's ``model`` section with the card's
classes, transfers the init's weights by name and shape (``transfer.json``), trains with the shared loop
(:mod:`voco.train.loop`) and writes, in the run folder:

* ``final.pt`` (the loop's resumable checkpoint), ``metrics.jsonl``, ``progress.png``;
* ``model.pt``: weights only (``{"model": state_dict, "arch": {...}}``), what ``voco evaluate`` loads;
* ``run.json``: everything ``voco evaluate`` and ``voco report`` need (ids, classes, ROI, times, the init's source);
* ``transfer.json``: loaded / skipped / mismatched / adapted tensors (empty lists for ``scratch``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voco.config import deep_merge
from voco.errors import CheckpointError, ConfigError, DataError
from voco.io import atomic_path, write_json

log = logging.getLogger(__name__)

INITS = ("scratch", "ssl", "stage1", "stage2", "suprem", "file")
METHODS = ("plain", "medcontext")
#: output-layer prefix per model name (never transferred when ``exclude_head``)
HEAD_PREFIX = {"swinunetr": "out.", "cnn_small": "out.", "unet": "final_conv.", "segresnet": "conv_final."}
CHECKPOINT_NAMES = ("backbone.pt", "final.pt")


# ------------------------------------------------------------------------------------------------ settings
def finetune_params(cfg: dict, card: dict) -> dict:
    """The effective fine-tuning settings of a dataset: the config's ``finetune`` section, then the card's overrides."""
    params = copy.deepcopy(cfg.get("finetune", {}))
    over = card.get("finetune", {}) or {}
    unknown = sorted(set(over) - set(params))
    if unknown:
        raise ConfigError(f"dataset card {card['id']}: unknown finetune key(s) {', '.join(unknown)} "
                          f"(allowed: {', '.join(sorted(params))})")
    return deep_merge(params, over)


def model_spec(cfg: dict) -> dict:
    """Model name / size / feature size from the config's ``model`` section (default: the laptop ``cnn_small``)."""
    m = cfg.get("model", {}) or {}
    spec = {"name": m.get("name", "cnn_small"), "size": m.get("size", "B"), "feature_size": m.get("feature_size")}
    if m.get("window_attention"):
        spec["window_attention"] = m["window_attention"]
    return spec


def num_classes(card: dict) -> int:
    """Segmentation: max label value + 1 (background included); classification: number of listed classes."""
    labels = {int(k): v for k, v in (card.get("labels") or {}).items()}
    if not labels:
        raise ConfigError(f"dataset card {card['id']}: needs a labels map to fine-tune")
    if card.get("task") == "classification":
        return len(labels)
    return max(labels) + 1


def parse_n(n: str | int | None) -> int | None:
    """``--n-train`` value: an int, or None for ``all``."""
    if n is None or str(n) == "all":
        return None
    try:
        v = int(n)
    except ValueError:
        raise ConfigError(f"--n-train must be a positive integer or 'all', got {n!r}") from None
    if v < 1:
        raise ConfigError(f"--n-train must be >= 1, got {v}")
    return v


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Splits:
    train: list[str]
    val: list[str]
    test: list[str]

    @property
    def eval_split(self) -> str:
        return "test" if self.test else "val"


def usable_ids(store: Any, split: str, task: str) -> list[str]:
    """Cases with a training target: a label map (segmentation) or a class >= 0 (classification)."""
    if task == "classification":
        return [c for c in store.ids(split=split) if case_class(store, c) >= 0]
    return store.ids(split=split, labelled=True)


def case_class(store: Any, case_id: str) -> int:
    """The manifest's ``class`` of a case (-1 when missing)."""
    v = store.row(case_id).get("class")
    try:
        return -1 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)
    except (TypeError, ValueError):
        return -1


def split_cases(store: Any, card: dict) -> Splits:
    """Train / val / test case ids (deterministic).

    Test = usable cases of the manifest's test split. When there are none, a held-out validation part of the training
    cases (``card.split.val_fraction``, seeded by ``card.split.seed``) plays that role and is never trained on.
    """
    task = card.get("task", "segmentation")
    pool = usable_ids(store, "train", task)
    test = usable_ids(store, "test", task)
    if not pool:
        raise DataError(f"{store.root}: no usable training cases (labelled, status ok) for dataset {card['id']}")
    if test:
        return Splits(pool, [], test)
    split = card.get("split", {}) or {}
    frac, seed = float(split.get("val_fraction", 0.2)), int(split.get("seed", 0))
    if len(pool) < 2:
        raise DataError(f"{store.root}: one usable case and no test split: nothing left to evaluate on")
    rng = np.random.default_rng(seed)
    # classification: stratified by class, so that the held-out cases hold every class (AUC is defined)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(pool):
        groups.setdefault(case_class(store, c) if task == "classification" else 0, []).append(i)
    val: set[int] = set()
    for members in groups.values():
        k = round(frac * len(members)) if len(groups) == 1 else max(1 if len(members) > 1 else 0, round(frac * len(members)))
        val.update(members[j] for j in rng.permutation(len(members))[:k].tolist())
    if not val:
        val = {int(rng.integers(len(pool)))}
    if len(val) == len(pool):
        val.discard(max(val))
    return Splits([c for i, c in enumerate(pool) if i not in val], [c for i, c in enumerate(pool) if i in val], [])


def select_train(ids: Sequence[str], n: int | None, seed: int) -> list[str]:
    """The first ``n`` of a permutation seeded by ``seed`` (all ids, in manifest order, when ``n`` is None)."""
    ids = list(ids)
    if n is None:
        return ids
    if n > len(ids):
        raise DataError(f"--n-train {n} but only {len(ids)} training cases are available")
    perm = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in sorted(perm[:n].tolist())]


# ------------------------------------------------------------------------------------------------ inits
def resolve_init(init: str, cfg: dict, init_path: str | None = None) -> Path | None:
    """Checkpoint file of an init (None for scratch).

    ``ssl|stage1|stage2|suprem``: ``--init-path`` if given, else ``<runs>/pretrain/<pretrain_run>/<init>/backbone.pt``,
    else ``final.pt`` there. ``file``: ``--init-path`` (a released VoCo / VoComni / SuPreM file or ours).
    """
    if init not in INITS:
        raise ConfigError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "scratch":
        if init_path:
            raise ConfigError("--init scratch takes no --init-path")
        return None
    if init_path:
        p = Path(init_path)
        if not p.is_file():
            raise CheckpointError(f"{p}: init checkpoint not found")
        return p
    if init == "file":
        raise ConfigError("--init file needs --init-path PATH (a VoCo / VoComni / SuPreM checkpoint)")
    run_dir = Path(cfg["paths"]["runs"]) / "pretrain" / cfg["finetune"]["pretrain_run"] / init
    for name in CHECKPOINT_NAMES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(
        f"{run_dir}: no {' or '.join(CHECKPOINT_NAMES)} for init {init!r}; run its pre-training first "
        f"(snakemake {run_dir}/final.pt) or pass --init-path"
    )


class Classifier(nn.Module):
    """Backbone's pooled-encoder embedding (SPEC 2 ``embed``) -> linear head -> class logits (N, K)."""

    def __init__(self, backbone: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.embed_dim), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.embed(x))


def build_network(arch: dict) -> nn.Module:
    """The network of a run from its ``arch`` record (model.pt / run.json)."""
    from voco.models import build_model

    seg_k = arch["out_channels"] if arch["task"] == "segmentation" else 2
    net = build_model(arch["name"], in_channels=arch["in_channels"], out_channels=seg_k, size=arch["size"],
                      feature_size=arch.get("feature_size"), window_attention=arch.get("window_attention"))
    if arch["task"] == "classification":
        net = Classifier(net, arch["out_channels"])
    return net


def transfer_init(net: nn.Module, arch: dict, ckpt: Path | None, params: dict) -> dict:
    """Load ``ckpt`` into ``net`` (its backbone for classifiers); returns the transfer report as a dict."""
    from voco.models import load_pretrained

    if ckpt is None:
        return {"source": None, "init": "scratch", "loaded": [], "skipped": [], "mismatched": [], "adapted": [],
                "excluded": [], "missing": [], "n_loaded": 0}
    target = net.backbone if isinstance(net, Classifier) else net
    exclude = (HEAD_PREFIX.get(arch["name"], "out."),) if params.get("exclude_head", True) else ()
    report = load_pretrained(target, ckpt, exclude=exclude, in_channels_mode=params.get("in_channels_mode", "repeat"))
    d = report.to_dict()
    log.info("transfer: %s", report.summary())
    return d


# ------------------------------------------------------------------------------------------------ data
def augment(
    x: torch.Tensor, y: torch.Tensor | None, params: dict
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample random flips (each axis, p ``flip_p``), x-y rot90 (p ``rot90_p``), intensity scale / shift.

    Args:
        x: (N, C, X, Y, Z) images; y: (N, 1, X, Y, Z) labels or None (spatial transforms applied identically).
    """
    xs, ys = [], []
    fp, rp = float(params.get("flip_p", 0.0)), float(params.get("rot90_p", 0.0))
    mag, ip = float(params.get("intensity", 0.0)), float(params.get("intensity_p", 0.0))
    for i in range(x.shape[0]):
        xi = x[i]
        yi = y[i] if y is not None else None
        for ax in (1, 2, 3):
            if torch.rand(()) < fp:
                xi = xi.flip(ax)
                yi = yi.flip(ax) if yi is not None else None
        if torch.rand(()) < rp and xi.shape[1] == xi.shape[2]:
            k = int(torch.randint(1, 4, ()))
            xi = torch.rot90(xi, k, (1, 2))
            yi = torch.rot90(yi, k, (1, 2)) if yi is not None else None
        if mag > 0 and torch.rand(()) < ip:
            xi = xi * (1.0 + (torch.rand(()) * 2 - 1) * mag)
        if mag > 0 and torch.rand(()) < ip:
            xi = xi + (torch.rand(()) * 2 - 1) * mag
        xs.append(xi)
        if yi is not None:
            ys.append(yi)
    return torch.stack(xs), (torch.stack(ys) if y is not None else None)


def segmentation_batches(store: Any, ids: list[str], params: dict, seed: int):
    """Batch factory for the loop: each batch = ``batch_size`` cases x ``samples_per_volume`` pos/neg crops."""
    from voco.data.loading import CropDataset

    roi = tuple(params["roi"])
    ds = CropDataset(store, roi, ids=ids, label="label", pos_neg=tuple(params["pos_neg"]),
                     samples_per_case=int(params["samples_per_volume"]), seed=seed)
    n = len(ids)
    b = max(1, min(int(params["batch_size"]), n))
    spv = int(params["samples_per_volume"])

    def batches(epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        ds.set_epoch(epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        groups = [order[i : i + b] for i in range(0, n - b + 1, b)]
        for grp in groups[start:]:
            items = [ds[int(c) + k * n] for c in grp for k in range(spv)]
            yield {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items])}

    return batches


def resize_volume(image: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """(X, Y, Z) or (C, X, Y, Z) -> (C, *size) float32 by trilinear resizing (the classifier's whole-volume view)."""
    t = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if t.ndim == 3:
        t = t[None]
    return F.interpolate(t[None], size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0]


def classification_batches(store: Any, ids: list[str], params: dict, seed: int):
    """Batch factory: whole volumes resized to the ROI, ``batch_size * samples_per_volume`` volumes per batch."""
    roi = tuple(params["roi"])
    vols = {c: resize_volume(store.load(c).image, roi) for c in ids}
    classes = {c: case_class(store, c) for c in ids}
    n = len(ids)
    b = max(1, min(int(params["batch_size"]) * int(params["samples_per_volume"]), n))

    def batches(epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        groups = [order[i : i + b] for i in range(0, n - b + 1, b)]
        for grp in groups[start:]:
            yield {"image": torch.stack([vols[ids[int(i)]] for i in grp]),
                   "class": torch.tensor([classes[ids[int(i)]] for i in grp], dtype=torch.long)}

    return batches


# ------------------------------------------------------------------------------------------------ steps
class MedContextNet(nn.Module):
    """The trainable part of a MedContext run: the student network and the learnable mask token.

    ``forward(x, mask) -> (clean logits, masked-view logits)`` (one call per step, as DDP wants).
    """

    def __init__(self, student: nn.Module, in_channels: int) -> None:
        super().__init__()
        from voco.train.medcontext import MaskToken

        self.student = student
        self.token = MaskToken(student, in_channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = self.student(x)
        with self.token.masked(self.student, mask) as prepare:
            masked = self.student(prepare(x))
        return clean, masked


def dicece_loss() -> nn.Module:
    """DiceCE (softmax, one-hot targets), MONAI's implementation."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


# ------------------------------------------------------------------------------------------------ run
def finetune(
    cfg: dict,
    card: dict,
    store: Any,
    out: str | Path,
    init: str,
    method: str = "plain",
    n_train: int | None = None,
    seed: int = 0,
    init_path: str | None = None,
    steps: int | None = None,
) -> dict:
    """Fine-tune one run; returns its ``run.json`` record. See the module docstring for the files written."""
    from voco.train.loop import LoopConfig, train
    from voco.train.medcontext import EmaTeacher, block_mask, cosine_momentum

    out = Path(out)
    task = card.get("task", "segmentation")
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if task == "classification" and method != "plain":
        raise ConfigError(f"dataset {card['id']} is a classification task: only --method plain applies")
    if task not in ("segmentation", "classification"):
        raise ConfigError(f"dataset {card['id']}: task {task!r} cannot be fine-tuned")
    params = finetune_params(cfg, card)
    if steps is not None:
        params["steps"] = int(steps)
    splits = split_cases(store, card)
    train_ids = select_train(splits.train, n_train, seed)
    ckpt = resolve_init(init, cfg, init_path)

    first = store.load(train_ids[0])
    in_ch = 1 if first.image.ndim == 3 else int(first.image.shape[0])
    arch = {**model_spec(cfg), "task": task, "in_channels": in_ch, "out_channels": num_classes(card)}
    torch.manual_seed(seed)
    net = build_network(arch)
    transfer = transfer_init(net, arch, ckpt, params)
    transfer["init"] = init
    write_json(out / "transfer.json", transfer)

    from voco.train import distributed as dist

    device = dist.default_device()
    loop_cfg = LoopConfig.from_mapping(
        params, steps=params["steps"], warmup=params["warmup_steps"], amsgrad=False, seed=seed,
        stage="finetune", method=method,
    )
    spv = int(params["samples_per_volume"])
    ema, after_step, crops = None, None, int(params["batch_size"]) * spv
    if task == "classification":
        model: nn.Module = net
        batches = classification_batches(store, train_ids, params, seed)
        ce = nn.CrossEntropyLoss()

        def step(m: nn.Module, batch: dict) -> dict:
            x, _ = augment(batch["image"], None, params)
            logits = m(x)
            loss = ce(logits, batch["class"])
            return {"total": loss, "ce": loss,
                    "acc": (logits.argmax(1) == batch["class"]).float().mean()}
    elif method == "plain":
        model = net
        batches = segmentation_batches(store, train_ids, params, seed)
        seg_loss = dicece_loss()

        def step(m: nn.Module, batch: dict) -> dict:
            x, y = augment(batch["image"], batch["label"], params)
            loss = seg_loss(m(x), y)
            return {"total": loss, "dice_ce": loss}
    else:
        from voco.train.medcontext import consistency_loss

        mc = params["medcontext"]
        net.to(device)
        model = MedContextNet(net, in_ch).to(device)
        teacher = EmaTeacher(net)
        ema = teacher
        batches = segmentation_batches(store, train_ids, params, seed)
        seg_loss = dicece_loss()
        total_steps = int(params["steps"])

        def step(m: nn.Module, batch: dict) -> dict:
            x, y = augment(batch["image"], batch["label"], params)
            mask = block_mask(x.shape[0], tuple(x.shape[2:]), int(mc["cube"]), float(mc["mask_ratio"]), device=x.device)
            clean, masked = m(x, mask)
            with torch.no_grad():
                t_logits = teacher.model(x)
            lc, lm = seg_loss(clean, y), seg_loss(masked, y)
            cons = consistency_loss(masked, t_logits, mc["loss_form"])
            return {"total": lc + lm + float(mc["beta"]) * cons, "dice_ce": lc, "dice_ce_masked": lm, "consistency": cons}

        def after_step(global_step: int, m: nn.Module) -> None:
            teacher.update(m.student, cosine_momentum(global_step, total_steps, float(mc["momentum"])))

    t0 = time.perf_counter()
    result = train(
        model, step, batches, loop_cfg, out, ema=ema, after_step=after_step, crops_per_step=crops,
        run_config={"finetune": params, "model": arch, "dataset": card["id"]}, device=device,
        progress_title=f"{card['id']} {init}/{method} N={n_train or 'all'} seed {seed}",
    )
    wall = time.perf_counter() - t0
    bare = model.student if isinstance(model, MedContextNet) else model
    with atomic_path(out / "model.pt") as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in bare.state_dict().items()}, "arch": arch}, tmp)
    record = {
        "dataset": card["id"], "task": task, "init": init, "init_source": str(ckpt) if ckpt else None,
        "method": method, "n_train": "all" if n_train is None else int(n_train), "n_train_used": len(train_ids),
        "seed": int(seed), "train_ids": train_ids, "val_ids": splits.val, "test_ids": splits.test,
        "eval_split": splits.eval_split, "arch": arch, "roi": list(params["roi"]), "steps": int(params["steps"]),
        "labels": {str(k): v for k, v in (card.get("labels") or {}).items()},
        "train_seconds": float(result.last.get("time", wall)) if result.last else _previous_seconds(out, wall),
        "final": str(result.final), "model": str(out / "model.pt"),
        "transfer": {k: len(transfer.get(k, [])) for k in ("loaded", "skipped", "mismatched", "adapted", "missing")},
    }
    write_json(out / "run.json", record)
    log.info("fine-tuned %s %s/%s N=%s seed %d in %.1f s -> %s", card["id"], init, method,
             record["n_train"], seed, record["train_seconds"], out)
    return record


def _previous_seconds(out: Path, default: float) -> float:
    from voco.io import read_json

    try:
        return float(read_json(out / "run.json")["train_seconds"])
    except (OSError, ValueError, KeyError):
        return default


def load_run(run_dir: str | Path) -> tuple[dict, nn.Module]:
    """``run.json`` and the trained network (eval mode, CPU) of a fine-tuning run folder."""
    from voco.io import read_json

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "model.pt").is_file():
        raise CheckpointError(f"{run_dir}: not a finished fine-tuning run (run.json / model.pt missing); "
                              "run voco finetune first")
    record = read_json(run_dir / "run.json")
    try:
        blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint for the user
        raise CheckpointError(f"{run_dir / 'model.pt'}: unreadable ({type(e).__name__}: {e})") from e
    net = build_network(blob["arch"])
    net.load_state_dict(blob["model"])
    net.eval()
    return record, net
