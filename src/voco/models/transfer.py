"""Loading pre-trained weights by name and shape (SPEC 6, 7), with a report of everything not loaded.

Accepts our checkpoints (``{"model": ...}``), ``{"state_dict": ...}`` / ``{"net": ...}`` / ``{"network_weights": ...}``
wrappers and raw state dicts (released VoCo / SuPreM files). Wrapper prefixes (``module.``, ``backbone.``,
``_orig_mod.``) are stripped. Loading is weights-only: no arbitrary object is ever unpickled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voco.errors import CheckpointError

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "net", "network_weights", "student")
STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.", "model.")


@dataclass
class TransferReport:
    """What ``load_pretrained`` did: names loaded, skipped (not in the model), mismatched (shape), adapted, missing."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    adapted: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_loaded"] = len(self.loaded)
        d["n_model"] = len(self.loaded) + len(self.missing) + len(self.adapted)
        return d

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)}, adapted {len(self.adapted)}, shape-mismatched "
            f"{len(self.mismatched)}, not in model {len(self.skipped)}, excluded {len(self.excluded)}, "
            f"model tensors left at init {len(self.missing)}"
        )


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` with ``weights_only=True`` on CPU; errors become CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint for the user
        raise CheckpointError(f"{path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: {e})") from e


def extract_state_dict(obj: Any, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint object (our ``{"model"}``, ``{"state_dict"}``, raw ...)."""
    seen = 0
    while isinstance(obj, dict) and seen < 4:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
        seen += 1
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{source}: no state dict found (expected tensors, or a 'model' / 'state_dict' entry)")


def strip_prefixes(
    state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = STRIP_PREFIXES
) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (repeatedly, e.g. ``module.backbone.``) from every key."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k = k[len(p) :]
                    changed = True
        out[k] = v
    return out


def load_pretrained(
    model: nn.Module,
    path_or_state: str | os.PathLike[str] | dict,
    exclude: tuple[str, ...] = (),
    in_channels_mode: str = "repeat",
    strict_shapes: bool = False,
) -> TransferReport:
    """Copy every checkpoint tensor whose (stripped) name and shape match a model tensor.

    Args:
        model: the target network (parameters and buffers are candidates).
        path_or_state: a checkpoint file or an already loaded dict.
        exclude: name prefixes never loaded (e.g. ``("out.",)`` to keep a fresh output layer).
        in_channels_mode: when the model has C input channels and the checkpoint's first convolution has 1:
            ``repeat`` copies the kernel C times divided by C; ``reinit`` keeps the model's initialisation.
        strict_shapes: raise instead of skipping on a shape mismatch.
    Returns:
        TransferReport (every skipped, mismatched, adapted tensor is also logged).
    Raises:
        CheckpointError: unreadable file, no state dict, nothing loadable, or a mismatch with ``strict_shapes``.
    """
    if isinstance(path_or_state, dict):
        source = "<state dict>"
        raw = path_or_state
    else:
        source = str(path_or_state)
        raw = read_checkpoint(path_or_state)
    state = strip_prefixes(extract_state_dict(raw, source))
    target = model.state_dict()
    report = TransferReport(source=source)
    new_state: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if exclude and name.startswith(tuple(exclude)):
            report.excluded.append(name)
            continue
        if name not in target:
            report.skipped.append(name)
            log.info("transfer %s: %s not in the model (skipped)", source, name)
            continue
        want = target[name]
        if tuple(tensor.shape) == tuple(want.shape):
            new_state[name] = tensor.to(want.dtype)
            report.loaded.append(name)
            continue
        if (
            in_channels_mode == "repeat"
            and tensor.ndim == want.ndim >= 3
            and tensor.shape[1] == 1
            and want.shape[1] > 1
            and tensor.shape[0] == want.shape[0]
            and tensor.shape[2:] == want.shape[2:]
        ):
            c = want.shape[1]
            new_state[name] = (tensor.repeat(1, c, *([1] * (tensor.ndim - 2))) / c).to(want.dtype)
            report.adapted.append({"name": name, "from": list(tensor.shape), "to": list(want.shape), "how": "repeat/C"})
            log.warning(
                "transfer %s: %s widened from %s to %s input channels (kernel repeated / %d)",
                source,
                name,
                tensor.shape[1],
                c,
                c,
            )
            continue
        item = {"name": name, "checkpoint": list(tensor.shape), "model": list(want.shape)}
        report.mismatched.append(item)
        log.warning(
            "transfer %s: %s shape %s in checkpoint vs %s in model (left at init)",
            source,
            name,
            list(tensor.shape),
            list(want.shape),
        )
        if strict_shapes:
            raise CheckpointError(
                f"{source}: {name} has shape {list(tensor.shape)}, the model needs {list(want.shape)}"
            )
    if not new_state:
        raise CheckpointError(
            f"{source}: no tensor matches the model by name and shape (first checkpoint keys: {list(state)[:5]}, "
            f"first model keys: {list(target)[:5]})"
        )
    done = set(new_state)
    report.missing = [n for n in target if n not in done]
    model.load_state_dict(new_state, strict=False)
    log.info("transfer %s", report.summary())
    return report
