"""Training progress files: ``metrics.jsonl`` (one JSON object per step) and ``progress.png`` (loss terms + accuracy)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

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
    """Append-only ``metrics.jsonl``; on resume, records after the checkpoint's step are dropped (they are redone)."""

    def __init__(self, path: str | os.PathLike[str], resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step] if resume_step else []
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._fh = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=float) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


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
