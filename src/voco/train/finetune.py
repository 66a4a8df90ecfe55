"""Downstream fine-tuning (SPEC 6): segmentation (plain | MedContext) and classification, from any init.

One run = one (dataset, init, method, N, seed). It reads the pre-processed store, picks the training cases (the first N
of a seeded permutation for label efficiency), builds the model of the config's ``model`` section with the card's
classes, transfers the init's weights by name and shape (``transfer.json``), trains with the shared loop
(:mod:`voco.train.loop`) and writes, in the run folder:

* ``metrics.jsonl``, ``progress.png`` (the loop's training curves);
* ``model.pt``: a self-describing model file (:mod:`voco.models.record`: weights, architecture, labels, the
  pre-processing and inference settings), what ``voco evaluate`` / ``predict`` / ``export`` load (:mod:`voco.runs`);
* ``run.json``: everything ``voco evaluate`` and ``voco report`` need (ids, classes, ROI, times, the init's source and
  checksum, the run's identity);
* ``transfer.json``: loaded / skipped / mismatched / adapted tensors (empty lists for ``scratch``).

While it trains, the folder also holds the loop's resumable ``last.pt`` / ``previous.pt`` / ``final.pt``; they are
removed once the files above all exist, so a finished run folder holds exactly the rule's outputs. A run whose
``run.json`` records the same identity (settings, init checksum, data) is not redone; a checkpoint or run of another
identity (e.g. the init was re-trained) is never reused: the run starts afresh and says what differs.
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
from torch import nn

from voco.config import deep_merge
from voco.errors import CheckpointError, ConfigError, DataError
from voco.io import write_json
from voco.models.classifier import Classifier, build_network
from voco.runs import case_class, resize_volume
from voco.train.settings import HEAD_PREFIX, model_spec, num_classes  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

INITS = ("scratch", "ssl", "stage1", "stage2", "suprem", "file")
METHODS = ("plain", "medcontext")
CHECKPOINT_NAMES = ("backbone.pt", "final.pt")


# ------------------------------------------------------------------------------------------------ settings
def finetune_params(cfg: dict, card: dict) -> dict:
    """The effective fine-tuning settings of a dataset (a plain dict).

    With a resolved :class:`voco.config.Config`, by the layer rule: experiment < the card's ``finetune`` < the user's
    overrides < flags (``Config.for_dataset``; a rule's slice is already resolved for its dataset). A plain dict (tests,
    scripts) gets the card's section merged on top."""
    from voco.config import Config, plain

    if isinstance(cfg, Config):
        return plain(cfg.for_dataset(card)["finetune"])
    params = copy.deepcopy(cfg.get("finetune", {}))
    over = card.get("finetune", {}) or {}
    unknown = sorted(set(over) - set(params) - {"epochs"})
    if unknown:
        raise ConfigError(f"dataset card {card['id']}: unknown finetune key(s) {', '.join(unknown)} "
                          f"(allowed: {', '.join(sorted(params))})")
    return deep_merge(params, over)


def training_length(params: dict, n_train: int) -> dict:
    """Steps of a run: ``finetune.steps``, or ``epochs x ceil(training cases / batch_size)`` when epochs is set.

    Returns the record written into run.json: ``{"steps", "epochs", "train_cases", "batch_size", "from"}``."""
    batch = max(1, int(params.get("batch_size", 1)))
    epochs = params.get("epochs")
    if epochs:
        per_epoch = -(-int(n_train) // batch)
        return {"steps": int(epochs) * per_epoch, "epochs": int(epochs), "train_cases": int(n_train),
                "batch_size": batch, "steps_per_epoch": per_epoch, "from": "epochs"}
    return {"steps": int(params["steps"]), "epochs": None, "train_cases": int(n_train), "batch_size": batch,
            "from": "steps"}


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


def split_cases(store: Any, card: dict, split_file: str | Path | None = None) -> Splits:
    """Train / val / test case ids (deterministic).

    Test = usable cases of the manifest's test split. A reference split file (``card.split.file``, found by
    :func:`find_split_file`, or ``split_file``) names the train and validation cases; otherwise, when there is no test
    split, a held-out validation part of the training cases (``card.split.val_fraction``, seeded by
    ``card.split.seed``) plays that role. Validation cases are never trained on.
    """
    task = card.get("task", "segmentation")
    pool = usable_ids(store, "train", task)
    test = usable_ids(store, "test", task)
    if not pool:
        raise DataError(f"{store.root}: no usable training cases (labelled, status ok) for dataset {card['id']}")
    split = card.get("split", {}) or {}
    if split_file is not None or split.get("file"):
        path = Path(split_file) if split_file is not None else find_split_file(card, store)
        named = read_split_file(path, pool + test)
        train = [c for c in pool if c in set(named["train"])]
        val = [c for c in pool if c in set(named["val"])]
        ftest = [c for c in pool + test if c in set(named["test"])] or test
        if not train:
            raise DataError(f"{path}: none of its training cases is a usable case of {store.root}")
        return Splits(train, val, ftest)
    if test:
        return Splits(pool, [], test)
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


SPLIT_KEYS = {"train": ("train", "training"), "val": ("val", "validation", "valid"), "test": ("test", "testing")}


def find_split_file(card: dict, store: Any) -> Path:
    """The card's ``split.file``: absolute, or relative to the cards folder, the dataset's raw folder or its NIfTI
    folder (``<data>/raw/<id>/``, ``<data>/nifti/<id>/``, found beside the store's ``<data>/prep/<id>``)."""
    from voco.config import cards_folder

    name = Path(str(card["split"]["file"]))
    if name.is_absolute():
        candidates = [name]
    else:
        data = Path(store.root).parent.parent  # <data>/prep/<id> -> <data>
        candidates = [Path(card.get("_path", cards_folder() / "x")).parent / name,
                      data / "raw" / card["id"] / name, data / "nifti" / card["id"] / name]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{card.get('_path', card['id'])}: key split.file: {str(name)!r} not found (looked in "
                      f"{', '.join(str(c.parent) for c in candidates)}); put the split file there or remove the key")


def read_split_file(path: Path, known: Sequence[str]) -> dict[str, list[str]]:
    """Case ids per split from a split file: ``{"train": [ids], "val": [ids], "test": [ids]}`` (or ``training`` /
    ``validation``), each entry an id or an MSD / MONAI datalist item ``{"image": ".../<case>.nii.gz", ...}``, whose
    case id is the image's file name (nnU-Net ``_0000`` channel suffix dropped)."""
    import json
    import re

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable split file ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a split file is a JSON object with train / val (/ test) lists")

    def case_id(entry: Any) -> str:
        if isinstance(entry, dict):
            entry = entry.get("image") or entry.get("id") or ""
            if isinstance(entry, list):
                entry = entry[0] if entry else ""
        name = Path(str(entry)).name
        name = re.sub(r"\.nii(\.gz)?$|\.nrrd$|\.mha$", "", name)
        return re.sub(r"_\d{4}$", "", name)

    out: dict[str, list[str]] = {}
    for split, keys in SPLIT_KEYS.items():
        items = next((doc[k] for k in keys if k in doc), [])
        if not isinstance(items, list):
            raise ConfigError(f"{path}: key {split}: expected a list of case ids or datalist items")
        out[split] = [case_id(e) for e in items]
    unknown = sorted(set(out["train"] + out["val"] + out["test"]) - set(known))
    if unknown:
        log.warning("%s: %d case(s) not in the store (rejected or absent): %s", path, len(unknown), unknown[:10])
    overlap = sorted(set(out["train"]) & set(out["val"] + out["test"]))
    if overlap:
        raise ConfigError(f"{path}: case(s) both in train and in val/test: {overlap[:10]}")
    return out


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
def resolve_init(init: str, cfg: dict, init_path: str | None = None) -> tuple[str, Path | None]:
    """(init id, checkpoint file) of an init (no file for scratch).

    ``ssl|stage1|stage2|suprem``: ``--init-path`` if given, else ``<runs>/pretrain/<pretrain_run>/<init>/backbone.pt``,
    else ``final.pt`` there. A released checkpoint by name (``VoCo_B_SSL_head`` ..., :data:`voco.inits.RELEASED`):
    ``--init-path`` or ``<data>/weights/<file>``. ``file:<path>``: that file (init id ``file-<stem>``). ``file`` or
    ``file-<stem>``: ``--init-path``.
    """
    from voco.inits import FILE_PREFIX, OURS, RELEASED, WEIGHTS_DIR, check_model, init_id

    if init.startswith(FILE_PREFIX):
        if init_path:
            raise ConfigError(f"--init {init} names its file already; drop --init-path")
        init_path = init[len(FILE_PREFIX):]
        init = init_id(init)
    known = init in OURS or init in RELEASED or init == "file" or init.startswith("file-")
    if not known:
        raise ConfigError(f"--init must be one of {', '.join(INITS)}, a released checkpoint ({', '.join(RELEASED)}), "
                          f"file:<path> or file-<name> with --init-path; got {init!r}")
    if init == "scratch":
        if init_path:
            raise ConfigError("--init scratch takes no --init-path")
        return init, None
    if init in RELEASED:
        try:
            check_model(init, cfg.get("model", {}) or {})
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not init_path:
            r = RELEASED[init]
            p = Path(cfg["paths"]["data"]) / WEIGHTS_DIR / r.filename
            if not p.is_file():
                raise CheckpointError(f"{p}: released checkpoint {init} not found; download {r.url} there "
                                      f"(or pass --init-path / use file:<path> in finetune.inits)")
            return init, p
    if init_path:
        p = Path(init_path)
        if not p.is_file():
            raise CheckpointError(f"{p}: init checkpoint not found")
        return init, p
    if init == "file" or init.startswith("file-"):
        raise ConfigError(f"--init {init} needs --init-path PATH (a VoCo / VoComni / SuPreM checkpoint)")
    run_dir = Path(cfg["paths"]["runs"]) / "pretrain" / cfg["finetune"]["pretrain_run"] / init
    for name in CHECKPOINT_NAMES:
        if (run_dir / name).is_file():
            return init, run_dir / name
    raise CheckpointError(
        f"{run_dir}: no {' or '.join(CHECKPOINT_NAMES)} for init {init!r}; run its pre-training first "
        f"(snakemake {run_dir}/final.pt) or pass --init-path"
    )


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
    """Per-sample random flips (each axis, p ``flip_p``), x-y rot90 (p ``rot90_p``), intensity scale / shift
    (:func:`voco.data.augment.augment_crops`, drawing from torch's RNG so the loop's checkpoint covers it).

    Args:
        x: (N, C, X, Y, Z) images; y: (N, 1, X, Y, Z) labels or None (spatial transforms applied identically).
    """
    from voco.data.augment import augment_crops

    return augment_crops(x, y, params)


def _stack_crops(items: list[dict]) -> dict[str, torch.Tensor]:
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items])}


def segmentation_batches(store: Any, ids: list[str], params: dict, seed: int, num_workers: int = 0):
    """Batch factory for the loop: each batch = ``batch_size`` cases x ``samples_per_volume`` pos/neg crops.

    Crops are drawn by a DataLoader with ``num_workers`` worker processes (0: in the training process); a crop is a
    function of (seed, epoch, index), so the batches are the same whatever the number of workers (exact resume).
    """
    from torch.utils.data import DataLoader

    from voco.data.loading import CropDataset
    from voco.train import preempt

    roi = tuple(params["roi"])
    ds = CropDataset(store, roi, ids=ids, label="label", pos_neg=tuple(params["pos_neg"]),
                     samples_per_case=int(params["samples_per_volume"]), seed=seed)
    n = len(ids)
    b = max(1, min(int(params["batch_size"]), n))
    spv = int(params["samples_per_volume"])

    def batches(epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        ds.set_epoch(epoch)  # before the loader's iterator exists: its workers get a copy of the dataset
        order = np.random.default_rng([seed, epoch]).permutation(n)
        groups = [order[i : i + b] for i in range(0, n - b + 1, b)]
        index_batches = [[int(c) + k * n for c in grp for k in range(spv)] for grp in groups[start:]]
        if not index_batches:
            return
        yield from DataLoader(ds, batch_sampler=index_batches, num_workers=num_workers, collate_fn=_stack_crops,
                              pin_memory=torch.cuda.is_available(), persistent_workers=False,
                              worker_init_fn=preempt.ignore_in_worker)  # the training process handles SIGTERM

    return batches


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


def dicece_loss(include_background: bool = False) -> nn.Module:
    """DiceCE (softmax, one-hot targets), MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` in plain torch
    (:class:`voco.train.losses.DiceCELoss`); the Dice term skips the background channel unless ``include_background``
    (the reference fine-tuning excludes it; the CE term always covers every class)."""
    from voco.train.losses import DiceCELoss

    return DiceCELoss(include_background=bool(include_background))


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
    device: str | torch.device | None = None,
    num_workers: int | str | None = None,
) -> dict:
    """Fine-tune one run; returns its ``run.json`` record. See the module docstring for the files written.

    ``device``: ``auto`` (default: the GPU when one is visible, with AMP) | ``cpu`` | ``cuda``. ``num_workers``: crop
    loader workers (default ``finetune.num_workers``; ``auto`` = the job's CPUs).
    """
    from dataclasses import asdict

    from voco.models.record import model_meta, preprocess_record, save_model
    from voco.train import distributed as dist
    from voco.train.checkpoint import finish_run, prepare_run_dir, run_identity
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
    if steps is not None:  # a command-line flag: above the card's epochs too
        params["steps"], params["epochs"] = int(steps), None
    splits = split_cases(store, card)
    train_ids = select_train(splits.train, n_train, seed)
    length = training_length(params, len(train_ids))
    params["steps"] = length["steps"]
    if length["from"] == "epochs":
        log.info("%s: %d epochs x %d steps per epoch (%d training cases, batch %d) = %d steps", card["id"],
                 length["epochs"], length["steps_per_epoch"], length["train_cases"], length["batch_size"],
                 length["steps"])
    init, ckpt = resolve_init(init, cfg, init_path)

    first = store.load(train_ids[0])
    in_ch = 1 if first.image.ndim == 3 else int(first.image.shape[0])
    arch = {**model_spec(cfg), "task": task, "in_channels": in_ch, "out_channels": num_classes(card)}
    if task == "classification":
        arch["pool"] = str(params.get("classification_pool", "encoder"))
    device = dist.select_device(device if isinstance(device, str) or device is None else str(device.type))
    workers = dist.resolve_num_workers(params.get("num_workers", 0) if num_workers is None else num_workers)
    loop_cfg = LoopConfig.from_mapping(
        params, steps=params["steps"], warmup=params["warmup_steps"], amsgrad=False, seed=seed,
        stage="finetune", method=method,
    )
    identity = run_identity(
        {"finetune": params, "loop": asdict(loop_cfg), "arch": arch, "dataset": card["id"], "task": task,
         "labels": {str(k): v for k, v in (card.get("labels") or {}).items()}, "init": init, "method": method,
         "n_train": "all" if n_train is None else int(n_train), "train_ids": train_ids},
        init=ckpt, data={"store": Path(store.root) / "manifest.parquet"},
    )
    done = _finished_record(out, identity)
    if done is not None:
        log.info("%s: fine-tuning run already complete with these settings and init: nothing to do", out)
        return done
    prepare_run_dir(out, identity, "finetune", method)  # afresh: removes the files of an earlier run
    torch.manual_seed(seed)
    net = build_network(arch)
    transfer = transfer_init(net, arch, ckpt, params)
    transfer["init"] = init
    write_json(out / "transfer.json", transfer)

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
        batches = segmentation_batches(store, train_ids, params, seed, workers)
        seg_loss = dicece_loss(bool(params.get("include_background", False)))

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
        batches = segmentation_batches(store, train_ids, params, seed, workers)
        seg_loss = dicece_loss(bool(params.get("include_background", False)))
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

    log.info("fine-tuning on %s (AMP %s), %d crop loader workers", device, loop_cfg.amp, workers)
    t0 = time.perf_counter()
    result = train(
        model, step, batches, loop_cfg, out, ema=ema, after_step=after_step, crops_per_step=crops,
        run_config={"finetune": params, "model": arch, "dataset": card["id"]}, identity=identity, finish=False,
        keep_files=("transfer.json",),
        device=device, progress_title=f"{card['id']} {init}/{method} N={n_train or 'all'} seed {seed}",
    )
    wall = time.perf_counter() - t0
    bare = model.student if isinstance(model, MedContextNet) else model
    preprocess = preprocess_record(first.meta)
    labels = {str(k): v for k, v in (card.get("labels") or {}).items()}
    # the sliding-window overlap / blending are evaluation settings (voco predict takes them from its config)
    inference = {"roi": list(params["roi"])}
    meta = model_meta(arch, "finetune", labels, preprocess, inference if task == "segmentation" else {},
                      {"dataset": card["id"], "init": init, "init_source": str(ckpt) if ckpt else None,
                       "method": method, "steps": int(params["steps"]), "seed": int(seed),
                       "n_train_used": len(train_ids)})
    save_model(out / "model.pt", bare.state_dict(), meta, arch)
    record = {
        "dataset": card["id"], "task": task, "init": init, "init_source": str(ckpt) if ckpt else None,
        "method": method, "n_train": "all" if n_train is None else int(n_train), "n_train_used": len(train_ids),
        "seed": int(seed), "train_ids": train_ids, "val_ids": splits.val, "test_ids": splits.test,
        "eval_split": splits.eval_split, "arch": arch, "roi": list(params["roi"]), "steps": int(params["steps"]),
        "training_length": length,
        "labels": labels, "preprocess": preprocess,
        "train_seconds": float(result.last.get("time", wall)) if result.last else _logged_seconds(out, wall),
        "model": str(out / "model.pt"), "device": str(device),
        "init_sha256": (identity.get("init") or {}).get("sha256"),
        "transfer": {**{k: len(transfer.get(k, [])) for k in ("loaded", "skipped", "mismatched", "adapted", "missing")},
                     "layout": transfer.get("layout"),
                     "encoder": {k: v for k, v in (transfer.get("encoder") or {}).items() if k != "missing"}},
        "identity": identity,
    }
    write_json(out / "run.json", record)
    finish_run(out, drop_final=True)  # every output exists: the resumable checkpoints can go
    log.info("fine-tuned %s %s/%s N=%s seed %d in %.1f s -> %s", card["id"], init, method,
             record["n_train"], seed, record["train_seconds"], out)
    return record


#: what a finished fine-tuning run folder holds (the rule's outputs)
RUN_OUTPUTS = ("model.pt", "run.json", "transfer.json", "metrics.jsonl", "progress.png")


def _finished_record(out: Path, identity: dict) -> dict | None:
    """The run.json of a complete run of this identity in ``out`` (every output present), else None."""
    from voco.io import read_json
    from voco.train.checkpoint import LAST, PREVIOUS

    if not all((out / f).is_file() for f in RUN_OUTPUTS) or (out / LAST).exists() or (out / PREVIOUS).exists():
        return None
    try:
        record = read_json(out / "run.json")
    except (OSError, ValueError):
        return None
    return record if record.get("identity") == identity else None


def _logged_seconds(out: Path, default: float) -> float:
    """Training time of a run resumed from its finished checkpoint: the last metrics record's clock."""
    from voco.train.progress import read_metrics

    recs = read_metrics(out / "metrics.jsonl")
    return float(recs[-1].get("time", default)) if recs else default
