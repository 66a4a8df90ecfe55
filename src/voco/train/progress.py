"""Training progress files: ``metrics.jsonl`` (one JSON object per step, the source of truth), ``progress.png`` (loss
terms + accuracy), and the views that TensorBoard and DVC read.

* TensorBoard: ``events.out.tfevents.*`` in the run folder (``tensorboard --logdir runs``), one scalar per logged key
  and step under ``train/<key>``; a resumed run purges the steps it redoes (``purge_step``).
* DVC: ``<runs>/tracking/metrics/<run path>.json`` (the last step's values: ``dvc metrics show``) and
  ``<runs>/tracking/plots/<run path>.tsv`` (every step: ``dvc plots show``), where ``<run path>`` is the run folder
  below ``<runs>`` (e.g. ``finetune/btcv/stage2/plain/nall-s0``). They sit outside the run folders because DVC reads
  a whole directory of metrics / plots and the run folders hold other JSON files; the project's ``dvc.yaml`` lists
  the two directories. A run outside ``<runs>/{pretrain,finetune}`` keeps them in ``<run>/tracking/``.

Why not DVCLive: measured here, it rewrites the repository's ``dvc.yaml`` on every run (or needs a per-run
``dvc.yaml``, which DVC ignores inside a stage output such as ``runs/finetune/<dataset>``), fails outside a git
repository with a commit, and writes no TensorBoard events. Both views are rebuilt from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any

import torch

from voco.io import atomic_path

log = logging.getLogger(__name__)

# keys that are not loss terms (plotted elsewhere or not at all)
NON_LOSS_KEYS = {"step", "epoch", "lr", "time", "step_s", "crops_per_s", "data_s", "stage", "grad_norm"}


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a torn last line from a killed run is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: ignoring a torn line (the previous run was interrupted)", path)
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records after the checkpoint's step are dropped (they are redone).

    With ``tensorboard`` (default), every record also goes to TensorBoard event files in the same folder. The records
    also travel inside every checkpoint (:meth:`packed`): a job whose ``metrics.jsonl`` was removed with its other
    outputs (Snakemake does so when a job fails or is pre-empted) gets it back on resume.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        resume_step: int = 0,
        saved: list[dict[str, Any]] | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step] if resume_step else []
        from_ckpt = [r for r in (saved or []) if int(r.get("step", 0)) <= resume_step] if resume_step else []
        if len(from_ckpt) > len(kept):
            log.info("%s: %d of %d records restored from the checkpoint", self.path, len(from_ckpt) - len(kept),
                     len(from_ckpt))
            kept = from_ckpt
        self._lines = [json.dumps(r) + "\n" for r in kept]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(self._lines))
        self._fh = self.path.open("a")
        self._tb = _summary_writer(self.path.parent, resume_step) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=float) + "\n"
        self._lines.append(line)
        self._fh.write(line)
        self._fh.flush()
        if self._tb is not None and "step" in record:
            step = int(record["step"])
            for k, v in record.items():
                if k not in ("step", "epoch") and _finite(v):
                    self._tb.add_scalar(f"train/{k}", float(v), step)

    def packed(self) -> torch.Tensor:
        """Every record so far, zlib-compressed, as a uint8 tensor (a weights-only checkpoint holds it)."""
        return pack_records("".join(self._lines))

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _summary_writer(folder: Path, resume_step: int) -> Any:
    """A TensorBoard writer in ``folder`` (None, with a warning, when the tensorboard package is missing)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # pragma: no cover - tensorboard is a pinned dependency
        log.warning("TensorBoard event files not written (%s); metrics.jsonl is complete", e)
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else None, flush_secs=30)


#: stage folders directly below the runs root (``<runs>/pretrain/...``, ``<runs>/finetune/...``)
STAGE_DIRS = ("pretrain", "finetune")


def tracking_paths(run_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(metrics JSON, plots TSV) that DVC reads for the run in ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    parts = run_dir.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in STAGE_DIRS and i + 1 < len(parts):
            root = Path(*parts[:i]) if i else Path(".")
            rel = Path(*parts[i:])
            return (root / "tracking" / "metrics" / rel.parent / f"{rel.name}.json",
                    root / "tracking" / "plots" / rel.parent / f"{rel.name}.tsv")
    return run_dir / "tracking" / "metrics.json", run_dir / "tracking" / "plots.tsv"


def write_tracking(metrics_path: str | os.PathLike[str]) -> tuple[Path, Path] | None:
    """Rewrite the DVC metrics JSON and plots TSV of a run from its ``metrics.jsonl`` (atomically); returns their paths.

    The TSV has a ``step`` column and one column per numeric key (blank where a step lacks it); the JSON holds the
    last step's numeric values.
    """
    records = read_metrics(metrics_path)
    if not records:
        return None
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k != "step" and k not in keys and isinstance(v, int | float) and not isinstance(v, bool):
                keys.append(k)
    mpath, ppath = tracking_paths(Path(metrics_path).parent)
    lines = ["\t".join(["step", *keys])]
    for r in records:
        lines.append("\t".join([str(int(r["step"]))] + [_cell(r.get(k)) for k in keys]))
    last = {"step": int(records[-1]["step"]), **{k: float(v) for k, v in records[-1].items()
                                               if k in keys and _finite(v)}}
    for path, text in ((ppath, "\n".join(lines) + "\n"), (mpath, json.dumps(last, indent=1) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return mpath, ppath


def _cell(v: Any) -> str:
    return repr(float(v)) if _finite(v) else ""


def pack_records(text: str) -> torch.Tensor:
    blob = zlib.compress(text.encode(), 6)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def unpack_records(packed: torch.Tensor | None) -> list[dict[str, Any]]:
    """Inverse of :meth:`MetricsLog.packed` (an empty list for None / a checkpoint without records)."""
    if packed is None or not isinstance(packed, torch.Tensor) or packed.numel() == 0:
        return []
    text = zlib.decompress(packed.numpy().tobytes()).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def restore_metrics(path: str | os.PathLike[str], saved: list[dict[str, Any]]) -> bool:
    """Rewrite ``metrics.jsonl`` from a checkpoint's records when the file lacks some of them; True if rewritten."""
    path = Path(path)
    if len(read_metrics(path)) >= len(saved):
        return False
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in saved))
    return True


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def plot_progress(
    metrics_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    title: str = "",
    chance: float | None = None,
) -> Path | None:
    """Write ``progress.png``: loss terms vs step (top) and accuracy-like keys (``*acc*``, bottom; ``chance`` drawn as
    a dashed line). Matplotlib Agg."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in keys and k not in NON_LOSS_KEYS and isinstance(v, int | float) and not isinstance(v, bool):
                keys.append(k)
    acc_keys = [k for k in keys if "acc" in k]
    loss_keys = [k for k in keys if k not in acc_keys]
    window = max(1, len(records) // 50)
    n_axes = 2 if acc_keys else 1
    fig, axes = plt.subplots(n_axes, 1, figsize=(8, 3.2 * n_axes), sharex=True, squeeze=False)
    ax = axes[0, 0]
    for k in loss_keys:
        xs = [s for s, r in zip(steps, records, strict=True) if _finite(r.get(k))]
        ys = [float(r[k]) for r in records if _finite(r.get(k))]
        if ys:
            ax.plot(xs, _smooth(ys, window), label=k, lw=1.6 if k == "total" else 1.0)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or Path(metrics_path).parent.name)
    if acc_keys:
        ax2 = axes[1, 0]
        for k in acc_keys:
            xs = [s for s, r in zip(steps, records, strict=True) if _finite(r.get(k))]
            ys = [float(r[k]) for r in records if _finite(r.get(k))]
            if ys:
                ax2.plot(xs, ys, alpha=0.25, lw=0.8)
                ax2.plot(xs, _smooth(ys, window), label=f"{k} (smoothed)", lw=1.6)
        if chance is not None:
            ax2.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.3g})")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("accuracy")
        ax2.grid(alpha=0.3)
        ax2.legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(png_path)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
