"""Loading pre-trained weights by name and shape (SPEC 6, 7), with a report of everything not loaded.

Accepts our checkpoints (``{"model": ...}``), ``{"state_dict": ...}`` / ``{"net": ...}`` / ``{"network_weights": ...}``
wrappers and raw state dicts (released VoCo / VoComni / SuPreM files). The official key names are mapped to ours
(:func:`map_official_keys`): wrapper prefixes (``module.``, ``backbone.``, ``_orig_mod.``, ``model.``) are stripped,
``swin_vit`` becomes ``swinViT`` (the official fine-tuning code's rename), and a bare Swin transformer
(``patch_embed.`` / ``layers1.`` ...) is placed under ``swinViT.``. The report says which layout was recognised, what
was renamed, and how many of the model's encoder tensors loaded. Loading is weights-only: no arbitrary object is
ever unpickled.
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
#: official name -> ours, at the start of a key (after the prefixes are stripped)
RENAMES = (("swin_vit.", "swinViT."),)
#: first components of a bare MONAI SwinTransformer state dict (the NV / VoCo SSL encoders without the UNETR around it)
SWIN_TOP = ("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.", "layers1c.", "layers2c.", "layers3c.",
            "layers4c.")
#: tensors of training heads the released files carry beside the backbone (never part of a segmentation model)
HEAD_PREFIXES = {"student.": "VoCo projection head", "teacher.": "VoCo EMA projection head",
                 "proj_head.": "VoCo v1 projection head", "projector.": "projection head",
                 "precls_conv.": "SuPreM head", "GAP.": "SuPreM head", "controller.": "SuPreM head",
                 "text_to_vision.": "SuPreM head", "organ_embedding": "SuPreM head"}


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
    layout: str = "voco"
    renamed: dict[str, int] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_loaded"] = len(self.loaded)
        d["n_model"] = len(self.loaded) + len(self.missing) + len(self.adapted)
        return d

    def summary(self) -> str:
        enc = (f"; encoder {self.encoder['loaded']}/{self.encoder['model']} tensors loaded"
               if self.encoder.get("model") else "")
        ren = f"; renamed {self.renamed}" if self.renamed else ""
        return (
            f"{self.source} ({self.layout} layout{ren}): loaded {len(self.loaded)}, adapted {len(self.adapted)}, "
            f"shape-mismatched {len(self.mismatched)}, not in model {len(self.skipped)}, excluded "
            f"{len(self.excluded)}, model tensors left at init {len(self.missing)}{enc}"
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


def map_official_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Official key names -> ours (see the module docstring).

    Returns:
        (mapped state dict, info): info holds ``layout`` (``voco`` = already ours, ``voco_ssl_head``, ``vocomni``,
        ``voco_v1``, ``suprem``, ``swin_encoder``), ``renamed`` (rule -> count, prefixes stripped included) and
        ``heads`` (training-head name -> tensor count: these are reported as not in the model).
    """
    renamed: dict[str, int] = {}
    out: dict[str, torch.Tensor] = {}
    for key, v in state.items():
        k, changed = key, True
        while changed:
            changed = False
            for p in STRIP_PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    renamed[f"strip {p}"] = renamed.get(f"strip {p}", 0) + 1
                    changed = True
        for old, new in RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                renamed[f"{old} -> {new}"] = renamed.get(f"{old} -> {new}", 0) + 1
        if k.startswith(SWIN_TOP):
            k = "swinViT." + k
            renamed["swin transformer -> swinViT."] = renamed.get("swin transformer -> swinViT.", 0) + 1
        out[k] = v
    heads: dict[str, int] = {}
    for k in out:
        for p, what in HEAD_PREFIXES.items():
            if k.startswith(p):
                heads[what] = heads.get(what, 0) + 1
    if "SuPreM head" in heads:
        layout = "suprem"
    elif "VoCo v1 projection head" in heads:
        layout = "voco_v1"
    elif "VoCo projection head" in heads:
        layout = "voco_ssl_head"
    elif "swin transformer -> swinViT." in renamed:
        layout = "swin_encoder"
    elif not heads and "out.conv.conv.weight" in out and out["out.conv.conv.weight"].shape[0] == 21:
        layout = "vocomni"
    else:
        layout = "voco"
    return out, {"layout": layout, "renamed": renamed, "heads": heads}


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
    state, info = map_official_keys(extract_state_dict(raw, source))
    target = model.state_dict()
    report = TransferReport(source=source, layout=info["layout"], renamed=info["renamed"], heads=info["heads"])
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
    decoder = tuple(getattr(model, "decoder_prefixes", ()))
    enc = [n for n in target if not (decoder and n.startswith(decoder))]
    report.encoder = {"model": len(enc), "loaded": sum(n in done for n in enc),
                      "missing": [n for n in enc if n not in done]}
    model.load_state_dict(new_state, strict=False)
    log.info("transfer %s", report.summary())
    return report
