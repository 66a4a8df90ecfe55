"""Released pre-trained checkpoints as fine-tuning inits, and the init names the workflow understands.

An entry of ``finetune.inits`` is one of

* ``scratch`` or one of our pre-training stages: ``ssl``, ``stage1``, ``stage2``, ``suprem``;
* a released checkpoint by name (:data:`RELEASED`, e.g. ``VoCo_B_SSL_head``): the file is looked for at
  ``<paths.data>/weights/<file name>``;
* ``file:<path>``: any checkpoint file (a released one, or ours); its init id (folder name of the runs) is
  ``file-<file stem>``.

Pure standard-library Python: the Snakefile imports it at parse time (through :mod:`voco.eval.plan`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath

OURS = ("scratch", "ssl", "stage1", "stage2", "suprem")
FILE_PREFIX = "file:"
WEIGHTS_DIR = "weights"  # under paths.data


@dataclass(frozen=True)
class Released:
    """A released checkpoint: where it is published and what it fits.

    ``revision`` / ``sha256`` pin the download (filled in once the Hugging Face downloader fetches and verifies model
    files; ``None`` = not pinned yet: a local copy is used as it is).
    """

    name: str
    repo: str
    filename: str
    model: str
    size: str
    layout: str
    description: str
    revision: str | None = None
    sha256: str | None = None

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/{self.revision or 'main'}/{self.filename}"


def _voco(size: str, f: int) -> list[Released]:
    return [
        Released(f"VoCo_{size}_SSL_head", "Luffy503/VoCo", f"VoCo_{size}_SSL_head.pt", "swinunetr", size,
                 "voco_ssl_head", f"VoCo self-supervised SwinUNETR-{size} (feature {f}) encoder + projection heads, "
                 "PreCT-160K"),
        Released(f"VoComni_{size}", "Luffy503/VoCo", f"VoComni_{size}.pt", "swinunetr", size, "vocomni",
                 f"VoCo omni-supervised SwinUNETR-{size} (feature {f}), whole network, 21 VoComni classes"),
    ]


#: name -> released checkpoint (names are the file stems the authors publish)
RELEASED: dict[str, Released] = {
    r.name: r
    for r in [
        *_voco("B", 48), *_voco("L", 96), *_voco("H", 192),
        Released("supervised_suprem_swinunetr_2100", "MrGiovanni/SuPreM", "supervised_suprem_swinunetr_2100.pth",
                 "swinunetr", "B", "suprem_swinunetr",
                 "SuPreM supervised SwinUNETR (v1 blocks, feature 48), AbdomenAtlas 2100 CT, 25 classes"),
    ]
}


def init_id(entry: str) -> str:
    """The init id of a ``finetune.inits`` entry (the ``{init}`` folder / wildcard of its runs)."""
    if entry.startswith(FILE_PREFIX):
        path = entry[len(FILE_PREFIX):]
        name = PurePath(path).name
        for suffix in (".pth.tar", ".pt", ".pth", ".ckpt", ".bin", ".tar"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        return "file-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "checkpoint")
    return entry


def init_paths(inits: list[str], data_root: str) -> dict[str, str | None]:
    """``{init id: checkpoint file}`` for the entries that name a file (released names and ``file:``), ``None`` for
    ours (their checkpoints come from the pre-training rules).

    Raises:
        ValueError: an unknown name, or two ``file:`` entries with the same id.
    """
    out: dict[str, str | None] = {}
    for entry in inits:
        iid = init_id(entry)
        if entry.startswith(FILE_PREFIX):
            path = entry[len(FILE_PREFIX):]
            if not path:
                raise ValueError("finetune.inits: 'file:' needs a path, e.g. file:/data/weights/VoCo_B_SSL_head.pt")
            if iid in out and out[iid] != path:
                raise ValueError(f"finetune.inits: {out[iid]} and {path} both give init id {iid!r}; rename one file")
            out[iid] = path
        elif entry in RELEASED:
            out[iid] = f"{data_root}/{WEIGHTS_DIR}/{RELEASED[entry].filename}"
        elif entry in OURS:
            out[iid] = None
        else:
            raise ValueError(f"finetune.inits: unknown init {entry!r}; use one of {', '.join(OURS)}, a released "
                             f"checkpoint ({', '.join(RELEASED)}) or file:<path>")
    return out


def check_model(name: str, model: Mapping) -> None:
    """Raise ValueError when the config's ``model`` cannot take the released checkpoint ``name``."""
    r = RELEASED[name]
    if model.get("name") != r.model or (model.get("feature_size") is None and model.get("size", "B") != r.size):
        raise ValueError(f"init {name} is a {r.model} size {r.size}; the config's model is {dict(model)}: set "
                         f"model: {{name: {r.model}, size: {r.size}}} (or fine-tune from another init)")
